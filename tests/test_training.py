"""Trainer: every method runs, checkpoints load and sample, stop and resume behave."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from pogdiff.model import checkpoints
from pogdiff.training import run_folder
from pogdiff.runs.store import RunStore
from pogdiff.config import DataConfig, PsiConfig, SampleConfig, TrainConfig
from pogdiff.data import load_image_text_set
from pogdiff.model.sampling import generate
from pogdiff.training.run import train
from tests.fakes import loss_curve
from tests.conftest import SMALL_MODEL

FAST = TrainConfig(batch_size=4, max_steps=2, checkpoint_every=0, log_every=0, warmup_steps=1)


@pytest.fixture(scope="module")
def dataset(small_demo):
    return load_image_text_set(small_demo / "train", DataConfig())


@pytest.mark.parametrize("method", ["baseline", "pogdiff", "cbdm", "resample"])
def test_two_steps_of_each_method_write_a_checkpoint_that_loads_and_samples(method, dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method=method)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "run")
    assert result.steps_done == 2 and not result.stopped
    assert result.last_checkpoint is not None and (result.last_checkpoint / "configs.json").exists()
    assert np.isfinite(loss_curve(result.history)).all()
    model = checkpoints.load_model(result.last_checkpoint)
    images = generate(model, [dataset.captions[0]], [0], SampleConfig(steps=2))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    record = run_folder.read_record(tmp_path / "run")  # the run's one record, run.json
    assert (record["state"], record["steps_done"], record["stopped"], record["method"]) == ("finished", 2, False, method)
    assert record["last_checkpoint"] == result.last_checkpoint.name
    assert record["train_cfg"]["method"] == method and record["model_cfg"]["preset"] == SMALL_MODEL.preset
    [run] = RunStore(tmp_path).list_runs()  # a command-line run is listed like one the Studio started
    assert (run.name, run.state, run.steps_done, run.max_steps, run.method) == ("run", "finished", 2, 2, method)


def test_stop_event_is_honoured_within_one_step(dataset, tmp_path):
    stop = threading.Event()
    seen = []

    def cb(info):
        seen.append(info.step)
        if info.step == 2:
            stop.set()

    cfg = dataclasses.replace(FAST, max_steps=50)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path, callback=cb,
                   stop_event=stop)
    assert result.stopped and result.steps_done == 2 and seen == [1, 2]
    assert result.last_checkpoint.name == "checkpoint-000002"


def test_pogdiff_with_every_row_gated_off_equals_the_plain_loss(dataset, tmp_path):
    base = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, method="baseline"),
                 run_dir=tmp_path / "b")
    # same batches as the baseline (no class-balanced draw), every row below the threshold
    gated = dataclasses.replace(FAST, method="pogdiff", balanced_sampling=False, psi=PsiConfig(psi_threshold=1e9))
    pog = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=gated, run_dir=tmp_path / "p")
    assert all(h.psi_active == 0.0 for h in pog.history)
    np.testing.assert_array_equal(loss_curve(pog.history), loss_curve(base.history))


def test_pogdiff_runs_the_neighbour_pass_only_for_rows_above_threshold(dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method="pogdiff", max_steps=4, caption_dropout=0.0)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    assert any(h.psi_active > 0 for h in result.history)
    assert all(0.0 <= h.psi_active <= 1.0 for h in result.history)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"learning_rate": -1.0}, "learning_rate must be a finite number > 0"),
        ({"caption_dropout": 1.5}, "caption_dropout must be in [0, 1)"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be"),
    ],
)
def test_bad_train_config_is_refused_with_a_clear_message(override, message, dataset, tmp_path):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, **override),
              run_dir=tmp_path)


def test_image_size_must_match_the_model(dataset, tmp_path):
    cfg = dataclasses.replace(SMALL_MODEL, resolution=16)
    with pytest.raises(ValueError, match="images are 32x32 but the model expects 16x16"):
        train(dataset=dataset, model_cfg=cfg, train_cfg=FAST, run_dir=tmp_path)


def test_ema_weights_are_saved_and_differ_from_the_raw_weights(dataset, tmp_path):
    import torch

    cfg = dataclasses.replace(FAST, max_steps=3, ema_decay=0.5)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    raw = checkpoints.load_model(result.last_checkpoint)
    ema = checkpoints.load_model(result.last_checkpoint, use_ema=True)
    diffs = [not torch.equal(a, b) for a, b in zip(raw.unet.parameters(), ema.unet.parameters())]
    assert any(diffs)


def test_balanced_sampling_follows_the_method_unless_set():
    from pogdiff.config import uses_balanced_sampling

    assert uses_balanced_sampling(TrainConfig(method="resample")) is True
    assert uses_balanced_sampling(TrainConfig(method="baseline")) is False
    assert uses_balanced_sampling(TrainConfig(method="baseline", balanced_sampling=True)) is True
    assert uses_balanced_sampling(TrainConfig(method="resample", balanced_sampling=False)) is False


# --- non-finite training -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(learning_rate=float("inf")), "learning_rate must be a finite number > 0, got inf"),
        (lambda: TrainConfig(learning_rate=float("nan")), "learning_rate must be a finite number > 0, got nan"),
        (lambda: TrainConfig(psi=PsiConfig(psi_max=float("inf"))), "psi_max must be a finite number >= 0, got inf"),
        (lambda: TrainConfig(cbdm_tau=-1.0), "cbdm_tau must be a finite number >= 0, got -1.0"),
        (lambda: dataclasses.replace(FAST, snr_gamma=float("nan")), "snr_gamma must be a finite number >= 0"),
    ],
)
def test_non_finite_or_out_of_range_numbers_are_refused_when_the_config_is_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_diverging_run_stops_naming_the_term_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    import torch
    from safetensors.torch import load_file

    from pogdiff.training.records import NonFiniteError

    cfg = dataclasses.replace(FAST, method="baseline", learning_rate=1e6, max_steps=30, checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step \d+: the 'mse' term of the loss is nan.*"
                                             r"Try a lower learning rate \(now 1e\+06\)") as info:
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    assert info.value.term == "mse"
    last = checkpoints.latest_checkpoint(tmp_path)
    assert last is not None and last.name == f"checkpoint-{info.value.step - 1:06d}"
    weights = load_file(last / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert run_folder.read_record(tmp_path)["state"] == "failed"


def test_a_non_finite_gradient_stops_before_the_weights_change(dataset, tmp_path):
    import torch

    from pogdiff.training.records import NonFiniteError
    from pogdiff.training.trainer import Trainer

    from pogdiff.training.run import build_model

    from pogdiff.method.prepare import prepare_data

    model = build_model(SMALL_MODEL)
    data = prepare_data(dataset, model, PsiConfig(), need_table=False)
    trainer = Trainer(model, data, dataclasses.replace(FAST, method="baseline"), run_dir=tmp_path)
    before = [p.detach().clone() for p in trainer.params]
    trainer.params[0].register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="the gradient norm is nan") as info:
        trainer.run_step()
    assert info.value.term == "gradient"
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))


# --- exact resume ------------------------------------------------------------------------------


def _tensors(ckpt):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(ckpt)}:{k}"] = v
    return out


def _stopped_at(n):
    stop = threading.Event()

    def cb(info):
        if info.step == n:
            stop.set()

    return stop, cb


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "warmup_steps": 2, "snr_gamma": 5.0,
         "noise_offset": 0.1, "method": "cbdm"},
    ],
    ids=["pogdiff", "accumulation-cosine-minsnr-offset-cbdm"],
)
def test_stop_and_resume_ends_with_bit_identical_unet_ema_and_optimizer(extra, dataset, tmp_path, monkeypatch):
    import torch

    from pogdiff.training.trainer import Trainer

    cfg = dataclasses.replace(FAST, max_steps=6, ema_decay=0.9, checkpoint_minutes=0.0,
                              **{"method": "pogdiff", **extra})
    full = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "full")
    stop, cb = _stopped_at(3)
    first = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split",
                  callback=cb, stop_event=stop)
    assert first.stopped and first.steps_done == 3

    modes = []
    run_step = Trainer.run_step

    def spy(self):
        modes.append(self.model.unet.training)
        return run_step(self)

    monkeypatch.setattr(Trainer, "run_step", spy)
    second = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split")
    assert second.steps_done == 6 and modes == [True, True, True]  # from_pretrained loads in eval mode
    a, b = _tensors(full.last_checkpoint), _tensors(second.last_checkpoint)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("ema_unet/") for k in a) and any(k.startswith("unet/") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    np.testing.assert_array_equal(loss_curve(second.history), loss_curve(full.history))
    assert [h.lr for h in second.history] == [h.lr for h in full.history]


def test_lr_follows_the_diffusers_schedule_with_warmup(dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method="baseline", max_steps=4, warmup_steps=2, learning_rate=1e-3)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    np.testing.assert_allclose([h.lr for h in result.history], [0.0, 5e-4, 1e-3, 1e-3])


def test_offset_noise_adds_one_constant_per_sample_and_channel(dataset, tmp_path):
    import torch

    from pogdiff.training.trainer import Trainer

    from pogdiff.training.run import build_model

    from pogdiff.method.prepare import prepare_data

    model = build_model(SMALL_MODEL)
    data = prepare_data(dataset, model, PsiConfig(), need_table=False)
    plain = Trainer(model, data, dataclasses.replace(FAST, method="baseline"), run_dir=tmp_path)
    offset = Trainer(model, data, dataclasses.replace(FAST, method="baseline", noise_offset=0.5), run_dir=tmp_path)
    a, b = plain.sample_batch(plain.generator(7)), offset.sample_batch(offset.generator(7))
    assert torch.equal(a.rows, b.rows) and torch.equal(a.t, b.t)
    diff = b.eps - a.eps
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert 0.05 < float(diff[:, :, 0, 0].abs().mean()) < 2.0


# --- faults: periodic checkpoints, fallback, run folder checks -----------------------------------


def test_checkpoints_are_written_by_time_and_pruned_to_the_limit(dataset, tmp_path, monkeypatch):
    saved = []
    real = checkpoints.save_checkpoint

    def spy(*args, **kwargs):
        saved.append((args[1], kwargs["keep"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", spy)
    cfg = dataclasses.replace(FAST, method="baseline", max_steps=4, checkpoint_minutes=1e-9,
                              checkpoints_total_limit=3)
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "timed")
    assert saved == [(1, 3), (2, 3), (3, 3), (4, 3)]
    assert sorted(p.name for p in (tmp_path / "timed").glob("checkpoint-*")) == [
        "checkpoint-000002", "checkpoint-000003", "checkpoint-000004"]
    saved.clear()
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(cfg, checkpoint_minutes=0.0),
          run_dir=tmp_path / "end-only")
    assert saved == [(4, 3)]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(dataset, tmp_path, caplog):
    import torch

    cfg = dataclasses.replace(FAST, method="pogdiff", max_steps=6, checkpoint_every=2, checkpoint_minutes=0.0)
    full = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "full")
    stop, cb = _stopped_at(4)
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split", callback=cb,
          stop_event=stop)
    weights = tmp_path / "split" / "checkpoint-000004" / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the tensor data: still loads, wrong numbers
    weights.write_bytes(bytes(raw))
    (tmp_path / "split" / ".tmp-checkpoint-000005-dead").mkdir()
    with caplog.at_level("WARNING", logger="pogdiff.training.run"):
        second = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split")
    assert "cannot resume from" in caplog.text and "checkpoint-000004" in caplog.text
    assert "does not match its checksum" in caplog.text
    assert not list((tmp_path / "split").glob(".tmp-*"))
    a, b = _tensors(full.last_checkpoint), _tensors(second.last_checkpoint)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_an_unwritable_or_full_run_folder_is_refused_before_step_1(dataset, tmp_path, monkeypatch):
    import collections

    steps = []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write to the run folder"):
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=FAST, run_dir=blocker / "run",
              callback=steps.append)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match=r"has 0\.0 MiB free but one checkpoint needs about \d+\.\d MiB"):
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=FAST, run_dir=tmp_path / "full-disk",
              callback=steps.append)
    assert steps == []


def test_resuming_another_method_or_data_is_refused_unless_a_new_run_is_asked(dataset, tmp_path):
    from pogdiff.training.run_folder import RunMismatchError

    base = dataclasses.replace(FAST, method="baseline")
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=base, run_dir=tmp_path)
    with pytest.raises(RunMismatchError, match="method 'baseline' in the run folder, 'pogdiff' now"):
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, method="pogdiff"),
              run_dir=tmp_path)
    fewer = dataclasses.replace(dataset, samples=dataset.samples[:-1], images=dataset.images[:-1])
    with pytest.raises(RunMismatchError, match=r"dataset_hash '[0-9a-f]+' in the run folder.*19 images; now.*18 images"):
        train(dataset=fewer, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(base, max_steps=3),
              run_dir=tmp_path)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, method="pogdiff"),
                   run_dir=tmp_path, resume=False)
    assert result.steps_done == 2 and len(result.history) == 2
    aside = list(tmp_path.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint-000002").is_dir()


def test_interrupted_runs_are_listed_until_they_finish(dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method="baseline", max_steps=4)
    stop, cb = _stopped_at(2)
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "a", callback=cb,
          stop_event=stop)
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "b")
    (tmp_path / "empty").mkdir()
    runs = RunStore(tmp_path).list_runs()  # the empty folder is no run
    assert sorted((r.name, r.steps_done, r.max_steps, r.method, r.state, r.stopped) for r in runs) == [
        ("a", 2, 4, "baseline", "stopped", True), ("b", 4, 4, "baseline", "finished", False)]
    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "a")
    assert [(r.name, r.state, r.steps_done) for r in RunStore(tmp_path).list_runs() if r.name == "a"] == [
        ("a", "finished", 4)]


def test_gradient_accumulation_averages_the_micro_batch_gradients(dataset, tmp_path, monkeypatch):
    import torch

    from pogdiff.training.trainer import Trainer

    from pogdiff.training.run import build_model

    from pogdiff.method.prepare import prepare_data

    model = build_model(SMALL_MODEL)
    data = prepare_data(dataset, model, PsiConfig(), need_table=False)
    cfg = dataclasses.replace(FAST, method="baseline", gradient_accumulation_steps=2, grad_clip=0.0)
    acc = Trainer(model, data, cfg, run_dir=tmp_path)
    grads = {}
    monkeypatch.setattr(acc, "optimize", lambda: grads.update(acc=[p.grad.clone() for p in acc.params]))
    terms, _ = acc.run_step()
    expected, losses_ = [torch.zeros_like(p) for p in acc.params], []
    one = Trainer(model, data, dataclasses.replace(cfg, gradient_accumulation_steps=1), run_dir=tmp_path)
    for micro in range(2):
        g = acc.generator(0, micro)
        one.optimizer.zero_grad(set_to_none=True)
        t, _ = one.forward_backward(acc.sample_batch(g), g)
        losses_.append(float(t["loss"].detach().mean()))
        expected = [e + p.grad / 2 for e, p in zip(expected, one.params)]
    assert acc.generator(0, 1).initial_seed() != acc.generator(0, 0).initial_seed()
    for a, e in zip(grads["acc"], expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    assert terms["loss"] == pytest.approx(sum(losses_) / 2, rel=1e-6)


def test_mixed_precision_comes_from_accelerate_unless_the_flag_is_given(monkeypatch):
    from pogdiff.cli import build_parser, configs_from_args
    from pogdiff.training.accelerator import accelerate_mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert accelerate_mixed_precision() == "bf16"
    _, cfg = configs_from_args(build_parser().parse_args(["train", "--run-dir", "r"]))
    assert cfg.mixed_precision == "bf16"
    _, cfg = configs_from_args(build_parser().parse_args(["train", "--run-dir", "r", "--mixed-precision", "no"]))
    assert cfg.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")  # not something this trainer runs
    assert accelerate_mixed_precision() is None


def test_mixed_precision_comes_from_the_accelerate_config_file(monkeypatch, tmp_path):
    import accelerate.commands.config.config_args as config_args

    from pogdiff.training.accelerator import accelerate_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    path = tmp_path / "default_config.yaml"
    monkeypatch.setattr(config_args, "default_config_file", str(path))
    assert accelerate_mixed_precision() is None  # no file
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: fp16\n"
                    "num_processes: 2\n")
    assert accelerate_mixed_precision() == "fp16"


def test_an_unknown_or_step_independent_lr_schedule_is_refused(dataset, tmp_path):
    for name in ("magic", "reduce_lr_on_plateau"):
        with pytest.raises(ValueError, match=f"unknown lr_scheduler '{name}'; choose one of linear, cosine"):
            train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, lr_scheduler=name),
                  run_dir=tmp_path)
