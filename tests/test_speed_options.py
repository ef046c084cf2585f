"""Speed options of a training run (README "Training options"): gradient checkpointing decided from
free memory, the AdamW kernel, channels-last, torch.compile, and SDPA attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pogdiff.training import memory
from pogdiff.bench.gpu import SD15_UNET_CONFIG
from pogdiff.config import DataConfig, ModelConfig, PsiConfig, TrainConfig, configs_from_options, model_preset
from pogdiff.data import load_image_text_set
from pogdiff.model.models import attention_processors, build_tiny, unwrap
from pogdiff.method.prepare import prepare_data
from pogdiff.training.memory import needs_gradient_checkpointing, step_memory_estimate
from pogdiff.training.optimizer import adamw_kernel_options, build_optimizer
from pogdiff.training.trainer import Trainer
from tests.conftest import SMALL_MODEL

FAST = TrainConfig(method="baseline", batch_size=4, max_steps=2, checkpoint_every=0, log_every=0, warmup_steps=0,
                   caption_dropout=0.0, checkpoint_minutes=0)
GIB = 2**30


@pytest.fixture(scope="module")
def dataset(small_demo):
    return load_image_text_set(small_demo / "train", DataConfig())


@pytest.fixture(scope="module")
def data(dataset):
    return prepare_data(dataset, build_tiny(SMALL_MODEL, seed=0), PsiConfig(), need_table=False)


def _trainer(data, tmp_path, *, model_cfg=SMALL_MODEL, **train):
    model = build_tiny(model_cfg, seed=0)
    return Trainer(model, data, dataclasses.replace(FAST, **train), run_dir=tmp_path / "run")


# ------------------------------------------------------------------- gradient checkpointing
def test_checkpointing_decision_is_a_function_of_free_memory_and_the_estimate():
    need = 10 * GIB
    assert needs_gradient_checkpointing("on", free_bytes=None, needed_bytes=need) is True
    assert needs_gradient_checkpointing("off", free_bytes=1, needed_bytes=need) is False
    assert needs_gradient_checkpointing("auto", free_bytes=None, needed_bytes=need) is False  # a CPU
    assert needs_gradient_checkpointing("auto", free_bytes=8 * GIB, needed_bytes=need) is True
    assert needs_gradient_checkpointing("auto", free_bytes=12 * GIB, needed_bytes=need) is True  # inside the margin
    assert needs_gradient_checkpointing("auto", free_bytes=13 * GIB, needed_bytes=need) is False
    assert needs_gradient_checkpointing("auto", free_bytes=11 * GIB, needed_bytes=need, margin=1.0) is False
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be one of 'auto', 'on', 'off', got 'yes'"):
        needs_gradient_checkpointing("yes", free_bytes=None, needed_bytes=need)


def test_the_memory_estimate_grows_with_batch_and_pixels_and_halves_in_bf16():
    from diffusers import UNet2DConditionModel

    assert memory.activation_units(SD15_UNET_CONFIG) == 2900
    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    full = step_memory_estimate(unet, batch_size=1, latent_pixels=64 * 64, mixed_precision="bf16")
    unet.requires_grad_(False)
    one = step_memory_estimate(unet, batch_size=1, latent_pixels=64 * 64, mixed_precision="bf16")
    eight = step_memory_estimate(unet, batch_size=8, latent_pixels=64 * 64, mixed_precision="bf16")
    assert eight == 8 * one and one > 0  # nothing trainable: activations only
    assert full - one == 3 * 4 * sum(p.numel() for p in unet.parameters())  # + gradient and two moments
    assert step_memory_estimate(unet, batch_size=8, latent_pixels=64 * 64, mixed_precision="no") == 2 * eight
    # the SD-1.5 step at batch 8, 512 px: the calibration point, about 8 GiB of activations
    assert 7.5 * GIB < eight < 9 * GIB


def test_model_config_reads_old_booleans_and_refuses_other_values():
    assert ModelConfig().gradient_checkpointing == "off"
    assert model_preset("sd15").gradient_checkpointing == "auto"
    assert ModelConfig(gradient_checkpointing=True).gradient_checkpointing == "on"
    assert ModelConfig(gradient_checkpointing=False).gradient_checkpointing == "off"
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be one of 'auto', 'on', 'off', got 'always'"):
        ModelConfig(gradient_checkpointing="always")


def test_train_flags_reach_the_configs():
    from pogdiff.cli import build_parser, configs_from_args

    args = build_parser().parse_args(["train", "--run-dir", "r", "--preset", "sd15", "--gradient-checkpointing", "on",
                                      "--adamw-kernel", "foreach", "--channels-last", "--compile"])
    model_cfg, train_cfg = configs_from_args(args)
    assert model_cfg.gradient_checkpointing == "on"
    assert (train_cfg.adamw_kernel, train_cfg.channels_last, train_cfg.compile_unet) == ("foreach", True, True)
    model_cfg, train_cfg = configs_from_args(build_parser().parse_args(["train", "--run-dir", "r", "--preset", "sd15"]))
    assert model_cfg.gradient_checkpointing == "auto"  # the preset's
    assert (train_cfg.adamw_kernel, train_cfg.channels_last, train_cfg.compile_unet) == ("auto", False, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--run-dir", "r", "--gradient-checkpointing", "sometimes"])
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be one of"):
        configs_from_options(gradient_checkpointing="sometimes")


def test_the_trainer_applies_the_checkpointing_choice(data, tmp_path, monkeypatch):
    on = _trainer(data, tmp_path / "on", model_cfg=dataclasses.replace(SMALL_MODEL, gradient_checkpointing="on"))
    assert on.model.unet.is_gradient_checkpointing and on.unet_options["gradient_checkpointing"] is True
    auto = dataclasses.replace(SMALL_MODEL, gradient_checkpointing="auto")
    monkeypatch.setattr(memory, "free_device_memory", lambda device: None)  # what a CPU reports
    cpu = _trainer(data, tmp_path / "cpu", model_cfg=auto)
    assert not cpu.model.unet.is_gradient_checkpointing and cpu.unet_options["free_bytes"] is None
    # a card with less free memory than the step needs: auto turns it on
    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1024)
    small_card = _trainer(data, tmp_path / "card", model_cfg=auto)
    assert small_card.model.unet.is_gradient_checkpointing
    assert small_card.unet_options["estimated_bytes"] > 1024


# ------------------------------------------------------------------------------ AdamW kernel
def test_adamw_kernel_choice_per_device():
    assert adamw_kernel_options("auto", "cuda") == {"fused": True}
    assert adamw_kernel_options("auto", "cpu") == {}  # torch's default: what CPU runs computed before
    assert adamw_kernel_options("foreach", "cuda") == {"foreach": True}
    assert adamw_kernel_options("loop", "cuda") == {"foreach": False}
    with pytest.raises(ValueError, match=r"adamw_kernel must be one of 'auto', 'fused', 'foreach', 'loop'"):
        adamw_kernel_options("apex", "cuda")
    with pytest.raises(ValueError, match=r"adamw_kernel must be one of"):
        TrainConfig(adamw_kernel="apex")


@pytest.mark.parametrize("kernel, foreach, fused", [
    ("auto", None, None), ("foreach", True, None), ("loop", False, None), ("fused", None, True),
])
def test_the_optimizer_is_built_with_the_kernel_asked_for(kernel, foreach, fused):
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(params, dataclasses.replace(FAST, adamw_kernel=kernel), "cpu")
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] == foreach and bool(opt.defaults["fused"]) == bool(fused)
    params[0].grad, params[1].grad = torch.ones(3, 2), torch.ones(2)
    opt.step()  # every kernel runs on a CPU
    assert bool((params[0] != 0).all())


# ----------------------------------------------------------------------------- channels-last
def test_channels_last_puts_weights_and_inputs_in_nhwc_and_keeps_the_losses(data, tmp_path):
    default = _trainer(data, tmp_path / "default")
    nhwc = _trainer(data, tmp_path / "nhwc", channels_last=True)
    convs = [p for p in nhwc.model.unet.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in default.model.unet.parameters()
                   if p.ndim == 4 and p.shape[-1] > 1)
    seen = []
    nhwc.model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)),
        with_kwargs=True)
    for _ in range(2):
        a, _ = default.run_step()
        b, _ = nhwc.run_step()
        default.step += 1
        nhwc.step += 1
        # NHWC kernels sum in another order; on CUDA cuDNN may also pick TF32 convolutions
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4 if nhwc.device.type == "cpu" else 1e-2, abs=1e-6)
    assert seen and all(seen)
    assert nhwc.save().is_dir()  # a channels-last model saves


# ---------------------------------------------------------------------------- torch.compile
def test_compile_wraps_the_unet_the_steps_run_through(data, tmp_path):
    """Wiring only: compiling the UNet on a 2-core CPU takes minutes, so no step is run here."""
    trainer = _trainer(data, tmp_path, compile_unet=True)
    assert isinstance(trainer.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert unwrap(trainer.unet) is trainer.model.unet  # saving and previews use the plain module
    assert not isinstance(_trainer(data, tmp_path / "plain").unet, torch._dynamo.eval_frame.OptimizedModule)


# ----------------------------------------------------------------------------------- SDPA
def test_the_tiny_unet_attends_through_pytorch_sdpa():
    assert attention_processors(build_tiny(SMALL_MODEL, seed=0).unet) == {"AttnProcessor2_0"}
