"""The Stable Diffusion code path, offline, with tiny randomly initialised pipeline parts.

A tiny UNet / VAE / CLIP pipeline is saved as a local diffusers folder and loaded through
:func:`pogdiff.model.models.load_stable_diffusion` exactly as a real one would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from pogdiff.model.checkpoints import load_model, save_checkpoint
from pogdiff.config import ModelConfig, SampleConfig, TrainConfig
from pogdiff.runs.export import export_diffusers
from pogdiff.model.models import LORA_TARGET_MODULES, attention_processors, load_stable_diffusion
from pogdiff.model.sampling import generate
from pogdiff.model.text import CLIPCaptionEncoder
from tests.fakes import SD_HIDDEN, SD_LORA_RANK, write_tiny_sd_pipeline

HIDDEN = SD_HIDDEN
RANK = SD_LORA_RANK
CAPTIONS = ["a photo of a cat", "a photo of a dog"]



@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    return write_tiny_sd_pipeline(folder, hidden=HIDDEN)


@pytest.fixture(scope="module")
def cfg(pipe_dir) -> ModelConfig:
    return ModelConfig(
        preset="sd15", pretrained=str(pipe_dir), resolution=32, cross_attention_dim=HIDDEN,
        text_encoder="clip", max_caption_tokens=77, beta_schedule="scaled_linear", lora_rank=RANK,
        gradient_checkpointing=True,
    )


@pytest.fixture(scope="module")
def model(cfg):
    return load_stable_diffusion(cfg)


def _inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, *model.latent_shape, generator=g)
    t = torch.tensor([10, 700])
    tokens, mask = model.encode_captions(CAPTIONS)
    return x_t, t, tokens, mask


def test_components_and_lora_layout(model):
    assert isinstance(model.noise_scheduler, DDPMScheduler)
    assert model.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert isinstance(model.text_encoder, CLIPCaptionEncoder)
    assert model.latent_shape == (4, 8, 8)
    assert model.is_lora and not model.uses_attention_mask
    trainable = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    targets = [n for n, m in model.unet.named_modules() if n.endswith(LORA_TARGET_MODULES) and hasattr(m, "lora_A")]
    assert len(trainable) == 2 * len(targets) > 0  # lora_A and lora_B of each projection
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.unet.parameters() if p.requires_grad
    }
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.text_model.parameters())
    assert model.unet.is_gradient_checkpointing
    assert attention_processors(model.unet) == {"AttnProcessor2_0"}  # PyTorch SDPA, LoRA included


def test_encode_decode_shapes(model):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = model.encode_images(images)
    assert x0.shape == (2, 4, 8, 8) and not x0.requires_grad
    dist = model.vae.encode(images).latent_dist
    torch.testing.assert_close(x0, dist.mode() * model.vae.config.scaling_factor)
    out = model.decode(x0)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1


def test_training_step_changes_only_lora(cfg):
    model = load_stable_diffusion(cfg)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.unet.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    vae = [p.detach().clone() for p in model.vae.parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    x_t, t, tokens, mask = _inputs(model)
    eps = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(model.predict_eps(x_t, t, tokens, mask), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.unet.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(torch.equal(a, b) for a, b in zip(model.vae.parameters(), vae, strict=True))
    changed = [n for n, v in lora.items() if not torch.equal(after[n], v)]
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)


def test_lora_checkpoint_loads_into_a_diffusers_pipeline(model, cfg, pipe_dir, tmp_path):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a LoRA that really changes the output
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x_t, t, tokens, _ = _inputs(model)
    with torch.no_grad():
        ours = model.predict_eps(x_t, t, tokens)
    path = save_checkpoint(tmp_path / "run", 4, model, train_cfg=TrainConfig(), keep=1)
    assert (path / "unet" / "pytorch_lora_weights.safetensors").is_file()
    out = export_diffusers(path, tmp_path / "lora")
    assert "pipe.load_lora_weights" in (out / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        before = pipe.unet(x_t, t, encoder_hidden_states=tokens).sample
        pipe.load_lora_weights(out)
        after = pipe.unet(x_t, t, encoder_hidden_states=tokens).sample
    assert (before - ours).abs().max() > 1e-3
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)

    reloaded = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict_eps(x_t, t, tokens), ours, rtol=0, atol=0)


def test_generate_two_steps(model):
    images = generate(model, CAPTIONS, [0, 1], SampleConfig(steps=2, guidance_scale=2.0))
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
    again = generate(model, CAPTIONS[1:], [1], SampleConfig(steps=2, guidance_scale=2.0))
    assert (images[1] == again[0]).all()


def test_vae_latents_are_cached_on_disk_and_reused(tmp_path, model):
    from pogdiff.method.prepare import encode_dataset_images

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    first = encode_dataset_images(model, images, cache_dir=tmp_path)
    files = list(tmp_path.glob("latents-*.safetensors"))
    assert len(files) == 1
    again = encode_dataset_images(model, images, cache_dir=tmp_path)
    torch.testing.assert_close(again, first)
    other = encode_dataset_images(model, images[::-1].copy(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 2
    assert not torch.equal(other, first)


@pytest.mark.parametrize("method", ["pogdiff", "cbdm"])
def test_trainer_fine_tunes_lora_on_the_stable_diffusion_path(method, cfg, small_demo, tmp_path):
    from pogdiff.config import DataConfig
    from pogdiff.data import load_image_text_set
    from pogdiff.training.run import train

    ds = load_image_text_set(small_demo / "train", DataConfig(resolution=32))
    train_cfg = TrainConfig(method=method, max_steps=2, batch_size=2, checkpoint_every=0, log_every=0)
    result = train(dataset=ds, model_cfg=cfg, train_cfg=train_cfg, run_dir=tmp_path / "run", cache_dir=tmp_path)
    assert result.steps_done == 2
    assert list(tmp_path.glob("latents-*.safetensors")), "VAE latents were not cached"
    reloaded = load_model(result.last_checkpoint)
    assert reloaded.is_lora
    images = generate(reloaded, [ds.captions[0]], [0], SampleConfig(steps=2))
    assert images.shape == (1, 32, 32, 3)


def test_mixed_precision_keeps_frozen_weights_in_half_and_lora_in_float32(cfg, small_demo, tmp_path):
    from pogdiff.config import DataConfig, PsiConfig
    from pogdiff.data import load_image_text_set
    from pogdiff.training.trainer import Trainer
    from pogdiff.method.prepare import prepare_data

    model = load_stable_diffusion(cfg)
    ds = load_image_text_set(small_demo / "train", DataConfig(resolution=32))
    data = prepare_data(ds, model, PsiConfig(), cache_dir=tmp_path)
    train_cfg = TrainConfig(method="pogdiff", max_steps=2, batch_size=2, checkpoint_every=0, log_every=0,
                            mixed_precision="bf16")
    trainer = Trainer(model, data, train_cfg, run_dir=tmp_path / "run")
    frozen = [p for p in trainer.model.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainer.params and all(p.dtype == torch.float32 for p in trainer.params)
    before = [p.detach().clone() for p in trainer.params]
    for _ in range(2):  # the warm-up gives the first step a learning rate of 0
        trainer.run_step()
        trainer.step += 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_train_tab_trains_sd15_on_data_loaded_at_the_tiny_size(tmp_path, pipe_dir, monkeypatch):
    """The Train tab's Start on the sd15 preset, with data the Data tab loaded at 32 px.

    The sd15 preset is shrunk to the tiny random SD parts of this file (64 px, their text width),
    the GPU check is bypassed, and training runs for real: the Studio must hand the job the set
    reloaded at the model's 64 px, and a LoRA checkpoint must come out.
    """
    import dataclasses

    from pogdiff import config, ui
    from pogdiff.training import run as training
    from pogdiff.runs.jobs import JobManager
    from pogdiff.ui.state import Device
    from tests.fakes import noop_progress, tiny_set, train_form

    real_preset = config.model_preset

    def tiny_sd15(name, **overrides):
        cfg = real_preset(name, **overrides)
        if name == "sd15":
            cfg = dataclasses.replace(cfg, resolution=64, cross_attention_dim=HIDDEN, lora_rank=RANK)
        return cfg

    monkeypatch.setattr(config, "model_preset", tiny_sd15)
    monkeypatch.setattr(Device, "on_gpu", property(lambda self: True))  # a GPU server, models on the CPU
    seen = []

    def spy_train(**kwargs):
        seen.append(kwargs["dataset"].images.shape)
        return training.train(**kwargs)

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", single_user=True, device="cpu",
                       jobs=JobManager(tmp_path / "runs", train_fn=spy_train))
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    assert studio.datasets.bundle(key).ds.images.shape[1] == 32  # what the Data tab loaded
    studio.train.start_run(key, train_form(method="pogdiff", preset="sd15", pretrained=str(pipe_dir), steps=2, batch_size=2,
                                     sample_every=0))
    status = studio.jobs.wait(600)
    assert status.state == "finished", status.error
    assert seen and seen[0][1:3] == (64, 64)  # the job got the set at the model's size
    saved = json.loads((Path(status.last_checkpoint) / "configs.json").read_text())
    assert saved["model"]["preset"] == "sd15" and saved["model"]["resolution"] == 64
    assert (Path(status.last_checkpoint) / "unet" / "pytorch_lora_weights.safetensors").is_file()  # LoRA only
    assert not (Path(status.last_checkpoint) / "unet" / "diffusion_pytorch_model.safetensors").exists()
