"""configs_from_options: one function from training options to validated configs (CLI and app)."""

from __future__ import annotations

import pytest

from pogdiff.cli import build_parser, configs_from_args
from pogdiff.config import Limits, PsiConfig, TrainConfig, configs_from_options


@pytest.mark.parametrize("options,message", [
    (dict(steps=0), r"steps must be >= 1 and <= 20000, a whole number; got 0"),
    (dict(steps=2.5), r"steps must be >= 1 and <= 20000, a whole number; got 2.5"),
    (dict(batch_size=1000), r"batch_size must be >= 1 and <= 256"),
    (dict(k=0), r"k must be >= 1 and <= 50"),
    (dict(seed=-1), r"seed must be >= 0"),
    (dict(psi_max=-1.0), r"psi_max must be a finite number >= 0 and <= 10, got -1.0"),
    (dict(psi_max=11), r"psi_max must be a finite number >= 0 and <= 10, got 11"),
    (dict(psi_max=float("nan")), r"psi_max must be a finite number"),
    (dict(lr=0.0), r"learning_rate must be a finite number > 0, got 0.0"),  # TrainConfig's name of --lr
    (dict(method="magic"), r"unknown method 'magic'; choose one of baseline, pogdiff, cbdm, resample"),
    (dict(preset="xl"), r"preset must be one of 'tiny', 'sd15', got 'xl'"),
    (dict(neighbour_pool="any"), r"neighbour_pool must be one of 'same_class', 'all', 'other_class'"),
    (dict(psi_schedule="linear"), r"psi_schedule must be one of 'constant', 'gaussian'"),
    (dict(optimizer="sgd"), r"unknown optimizer 'sgd'; choose one of adamw, adamw8bit"),
    (dict(report_to="wandb"), r"unknown report_to 'wandb'; choose one of none, tensorboard"),
    (dict(mixed_precision="fp8"), r"mixed_precision must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
    (dict(warmup_steps=-1), r"warmup_steps must be >= 0, a whole number; got -1"),
    (dict(gradient_accumulation_steps=0), r"gradient_accumulation_steps must be >= 1"),
    (dict(ema_decay=1.0), r"ema_decay must be a finite number >= 0 and < 1"),
    (dict(use_density="yes"), r"use_density must be true or false, got 'yes'"),
    (dict(balanced_sampling=1), r"balanced_sampling must be true, false or unset, got 1"),
])
def test_a_bad_option_is_refused_naming_it(options, message):
    with pytest.raises(ValueError, match=message):
        configs_from_options(**options)


def test_limits_bound_the_counts_and_psi_max():
    tight = Limits(max_steps=10, max_psi_max=2.0)
    with pytest.raises(ValueError, match=r"steps must be >= 1 and <= 10"):
        configs_from_options(steps=11, limits=tight)
    with pytest.raises(ValueError, match=r"psi_max must be a finite number >= 0 and <= 2"):
        configs_from_options(psi_max=2.5, limits=tight)
    assert configs_from_options(steps=10, psi_max=2.0, limits=tight)[1].max_steps == 10


def test_unset_options_keep_the_preset_defaults():
    model_cfg, train_cfg = configs_from_options()
    assert train_cfg == TrainConfig() and model_cfg.preset == "tiny"
    model_cfg, train_cfg = configs_from_options(preset="sd15", method="cbdm")
    assert (train_cfg.batch_size, train_cfg.learning_rate, train_cfg.method) == (4, 1e-4, "cbdm")
    assert model_cfg.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    _, cfg = configs_from_options(psi_max=2, k=7, use_image_sim=False, neighbour_pool="all",
                                  psi_schedule="constant", neighbour_sampling="nearest")
    assert cfg.psi == PsiConfig(psi_max=2.0, k=7, use_image_sim=False, pool="all", schedule="constant",
                                sampling="nearest")
    assert isinstance(cfg.psi.psi_max, float)


def test_command_line_and_app_give_equal_configs_for_equal_options(tmp_path):
    pytest.importorskip("gradio")
    from pogdiff import ui

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    ui_model, ui_train = studio.train.build_configs(ui.TrainForm(method="cbdm", preset="tiny", steps=40, batch_size=8,
                                                           lr=3e-4, psi_max=2.5, k=7, use_image_sim=False,
                                                           pool="all", sample_every=0, seed=5))
    args = build_parser().parse_args([
        "train", "--run-dir", "r", "--method", "cbdm", "--preset", "tiny", "--steps", "40", "--batch-size", "8",
        "--lr", "3e-4", "--psi-max", "2.5", "--k", "7", "--no-image-sim", "--neighbour-pool", "all",
        "--seed", "5", "--mixed-precision", "no",
        "--checkpoint-every", str(ui_train.checkpoint_every), "--warmup-steps", str(ui_train.warmup_steps),
    ])
    cli_model, cli_train = configs_from_args(args)
    assert cli_model == ui_model
    assert cli_train == ui_train


def test_the_command_line_refuses_a_bad_psi_max_before_loading_data(monkeypatch, capsys, tmp_path):
    from pogdiff import cli

    monkeypatch.setattr(cli, "resolve_data", lambda *a, **k: pytest.fail("data was loaded"))
    assert cli.main(["train", "--run-dir", str(tmp_path / "r"), "--psi-max", "11"]) == 2
    assert "psi_max must be a finite number >= 0 and <= 10, got 11.0" in capsys.readouterr().err


def test_resolution_option_sets_the_model_size_and_is_checked():
    from pogdiff.config import configs_from_options

    assert configs_from_options(preset="sd15", resolution=256)[0].resolution == 256
    assert configs_from_options(preset="tiny")[0].resolution == 32
    with pytest.raises(ValueError, match="resolution must be a whole number of pixels in \\[16, 2048\\] divisible by 8"):
        configs_from_options(preset="sd15", resolution=260)
    with pytest.raises(ValueError, match="divisible by 4 for the tiny preset, got 30"):
        configs_from_options(preset="tiny", resolution=30)


def test_cli_refuses_a_tiny_base_at_another_resolution(tmp_path, capsys):
    from pogdiff.cli import main

    rc = main(["train", "--data", "demo", "--steps", "1", "--resolution", "64", "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    assert "was trained at 32 px but --resolution is 64" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work
