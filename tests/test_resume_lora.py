"""Exact resume on the Stable Diffusion path: LoRA weights, their EMA and the optimizer, with a
v-prediction pipeline (tiny random parts, offline)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from pogdiff.config import DataConfig, ModelConfig, TrainConfig
from pogdiff.data import load_image_text_set
from pogdiff.training.run import train
from tests.fakes import loss_curve
from tests.fakes import SD_HIDDEN as HIDDEN, SD_LORA_RANK as RANK, tiny_sd_pipeline


@pytest.fixture(scope="module")
def v_cfg(tmp_path_factory) -> ModelConfig:
    folder = tmp_path_factory.mktemp("sd-v")
    pipe = tiny_sd_pipeline(folder)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.save_pretrained(folder / "pipe")
    return ModelConfig(
        preset="sd15", pretrained=str(folder / "pipe"), resolution=32, cross_attention_dim=HIDDEN,
        text_encoder="clip", max_caption_tokens=77, beta_schedule="scaled_linear", lora_rank=RANK,
    )


def _tensors(ckpt):
    return {f"{f.relative_to(ckpt)}:{k}": v for f in sorted(ckpt.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def test_lora_ema_and_optimizer_resume_bit_identically_with_v_prediction(v_cfg, small_demo, tmp_path):
    # The first run computes (and caches) the VAE latents, the later ones read them from the cache.
    ds = load_image_text_set(small_demo / "train", DataConfig(resolution=32))
    cfg = TrainConfig(method="pogdiff", max_steps=4, batch_size=2, checkpoint_every=0, checkpoint_minutes=0.0,
                      log_every=0, warmup_steps=1, ema_decay=0.9, snr_gamma=5.0)
    full = train(dataset=ds, model_cfg=v_cfg, train_cfg=cfg, run_dir=tmp_path / "full", cache_dir=tmp_path)
    stop = threading.Event()
    first = train(dataset=ds, model_cfg=v_cfg, train_cfg=cfg, run_dir=tmp_path / "split", cache_dir=tmp_path,
                  stop_event=stop, callback=lambda info: info.step == 2 and stop.set())
    assert first.steps_done == 2
    second = train(dataset=ds, model_cfg=v_cfg, train_cfg=dataclasses.replace(cfg), run_dir=tmp_path / "split",
                   cache_dir=tmp_path)
    assert second.steps_done == 4
    a, b = _tensors(full.last_checkpoint), _tensors(second.last_checkpoint)
    assert any(k.startswith("ema_unet/") for k in a) and any("lora" in k for k in a)
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert loss_curve(second.history).tolist() == loss_curve(full.history).tolist()
