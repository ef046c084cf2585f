"""The GPU benchmark's Trainer part (BENCHMARKS.md "GPU"): the project's :class:`pogdiff.training.trainer.Trainer`
timed on an SD-like model with random weights, cached latents and text states, with the plain and the
PoGDiff objectives and one configuration per speed option; and the Neighbours tab's sd15 preparation.
:mod:`pogdiff.bench.gpu` runs it beside the diffusers example's step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)


CAPTION_TOKENS = 77  # CLIP's padded caption length, as the sd15 preset caches it
TRAIN_ROWS = 64  # rows of the synthetic set: 8 classes, long-tailed
CLASS_COUNTS = (24, 12, 8, 6, 5, 4, 3, 2)

# The trainer's configurations: TrainConfig / ModelConfig overrides of the sd15 preset's run.
# "plain" and "pogdiff" are what ``pogdiff train --preset sd15`` does (gradient checkpointing "auto",
# AdamW "auto"); each other one changes one option, so its effect is its time against "plain".
TRAINER_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"method": "baseline"},
    "pogdiff": {"method": "pogdiff"},
    "pogdiff, neighbour pass for every row": {"method": "pogdiff", "psi_threshold": -1.0},
    "plain, gradient checkpointing on": {"method": "baseline", "gradient_checkpointing": "on"},
    "plain, gradient checkpointing off": {"method": "baseline", "gradient_checkpointing": "off"},
    "plain, channels-last": {"method": "baseline", "channels_last": True},
    "plain, AdamW foreach": {"method": "baseline", "adamw_kernel": "foreach"},
    "plain, AdamW for-loop": {"method": "baseline", "adamw_kernel": "loop"},
    "plain, torch.compile": {"method": "baseline", "compile_unet": True},
    "pogdiff, torch.compile": {"method": "pogdiff", "compile_unet": True},
    "plain, 8-bit AdamW": {"method": "baseline", "optimizer": "adamw8bit"},
}
SHORT_CONFIGS = {"plain, 8-bit AdamW": 2}  # timed steps: a first run that it works, not a figure
COMPILE_WARMUP = 3  # untimed steps of a compiled configuration (the compiles happen in them)


class RandomStates:
    """A stand-in caption encoder: seeded random token states ``[L, dim]`` per caption, the same for
    the same caption; captions of one class share most of their pooled vector (as real ones do)."""

    name = "random"

    def __init__(self, dim: int, tokens: int = CAPTION_TOKENS) -> None:
        self.token_dim = self.pooled_dim = dim
        self.max_tokens = tokens

    def encode(self, captions):
        import torch

        from pogdiff.model.text import TextEmbeddings

        def seeded(text: str) -> torch.Generator:
            return torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))

        tokens = torch.stack([torch.randn(self.max_tokens, self.token_dim, generator=seeded(c)) for c in captions])
        subject = [c.rsplit(" ", 1)[0] for c in captions]  # "class 3 row 7" -> "class 3 row"
        pooled = torch.stack([torch.randn(self.token_dim, generator=seeded(s)) + 0.5 * tokens[i, 0]
                              for i, s in enumerate(subject)])
        mask = torch.ones(len(captions), self.max_tokens, dtype=torch.bool)
        return TextEmbeddings(torch.nn.functional.normalize(pooled, dim=-1), tokens, mask)


def sd_like_model(unet_config: dict[str, Any], *, lora_rank: int, device: str, seed: int = 0,
                  gradient_checkpointing: str = "auto"):
    """A :class:`pogdiff.model.models.DiffusionModel` as the sd15 preset builds it (LoRA on the attention
    projections, DDPM scaled-linear schedule, no caption mask), around a random UNet of
    ``unet_config`` made on ``device``; captions come from :class:`RandomStates` and there is no
    VAE (the trainer reads cached latents only). Its ``resolution`` is the latent size."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pogdiff.config import model_preset
    from pogdiff.model.models import add_lora, from_parts

    cfg = model_preset("sd15", pretrained="", resolution=unet_config["sample_size"], lora_rank=lora_rank,
                       cross_attention_dim=unet_config["cross_attention_dim"],
                       gradient_checkpointing=gradient_checkpointing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config)
        add_lora(unet, lora_rank)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return from_parts(cfg, unet=unet, scheduler=scheduler, text_encoder=RandomStates(cfg.cross_attention_dim))


def synthetic_train_data(model, *, need_table: bool, seed: int = 0):
    """:class:`pogdiff.method.prepare.TrainData` of a long-tailed synthetic set (``CLASS_COUNTS``): latents
    ``[N, 4, h, w]`` drawn around one mean per class, captions encoded once, the neighbour table of
    the default PsiConfig built by :func:`pogdiff.method.prepare.neighbour_table`: the cached tensors a run
    reads, without images, VAE or CLIP."""
    import torch

    from pogdiff.config import PsiConfig
    from pogdiff.method.prepare import TrainData, neighbour_table, similarity_features

    g = torch.Generator().manual_seed(seed)
    subjects = [f"class {c}" for c, n in enumerate(CLASS_COUNTS) for _ in range(n)]
    captions = [f"{s} row {i}" for i, s in enumerate(subjects)]
    shape = (model.unet.config.in_channels, model.config.resolution, model.config.resolution)
    means = torch.randn(len(CLASS_COUNTS), *shape, generator=g)
    class_ids = torch.tensor([int(s.split()[1]) for s in subjects])
    x0 = means[class_ids] + 0.5 * torch.randn(len(subjects), *shape, generator=g)
    text = model.text_encoder.encode(captions)
    feats = similarity_features(None, x0, latent=True)
    table = neighbour_table(text.pooled.numpy(), feats, PsiConfig(), subjects, clean=x0) if need_table else None
    return TrainData(x0=x0, text=text, captions=captions, subjects=subjects, class_ids=class_ids, table=table,
                     image_feats=feats)


def _trainer_config(name: str, *, batch: int, mixed_precision: str):
    from pogdiff.config import PsiConfig, train_preset

    over = dict(TRAINER_CONFIGS[name])
    over.pop("gradient_checkpointing", None)
    threshold = over.pop("psi_threshold", None)
    psi = PsiConfig() if threshold is None else dataclasses.replace(PsiConfig(), psi_threshold=threshold)
    return train_preset("sd15", batch_size=batch, max_steps=10**6, checkpoint_every=0, log_every=0,
                        checkpoint_minutes=0, warmup_steps=0, mixed_precision=mixed_precision, psi=psi, **over)


def time_trainer(name: str, unet_config: dict[str, Any], *, batch: int, steps: int, warmup: int, lora_rank: int,
                 device: str, mixed_precision: str) -> dict[str, Any]:
    """Time ``steps`` calls of :meth:`Trainer.run_step` in configuration ``name`` (``TRAINER_CONFIGS``)
    after ``warmup`` untimed ones: s/step, FLOP per step (``torch.utils.flop_counter``, one step; not
    for compiled configurations, whose math is that of their plain twin), peak memory (CUDA), the
    share of rows that ran the neighbour pass, and what the trainer decided (checkpointing, AdamW)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pogdiff.model.models import attention_processors
    from pogdiff.training.trainer import Trainer

    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = _trainer_config(name, batch=batch, mixed_precision=mixed_precision)
    model = sd_like_model(unet_config, lora_rank=lora_rank, device=device,
                          gradient_checkpointing=TRAINER_CONFIGS[name].get("gradient_checkpointing", "auto"))
    data = synthetic_train_data(model, need_table=cfg.method == "pogdiff")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, data, cfg, run_dir=Path(run_dir))
        active: list[float] = []

        def step() -> None:
            terms, stats = trainer.run_step()
            trainer.step += 1
            active.append(stats.get("psi_active", 0.0))
            if not all(math.isfinite(v) for v in terms.values()):
                raise RuntimeError(f"{name}: non-finite loss terms {terms}")

        for _ in range(max(warmup, COMPILE_WARMUP if cfg.compile_unet else 0)):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        flops = None
        if not cfg.compile_unet:
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            flops = counter.get_total_flops()
        sync()
        active.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        sec = (time.perf_counter() - t0) / steps
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        out = {
            "seconds_per_step": round(sec, 4), "it_per_s": round(1 / sec, 3), "timed_steps": steps,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "flop_per_step": flops, "tflop_per_step": None if flops is None else round(flops / 1e12, 4),
            "achieved_tflops": None if flops is None else round(flops / sec / 1e12, 2),
            "psi_active_share": round(sum(active) / len(active), 3),
            "gradient_checkpointing": trainer.unet_options["gradient_checkpointing"],
            "estimated_step_gib": round(trainer.unet_options["estimated_bytes"] / 2**30, 2),
            "free_gib_at_start": (None if trainer.unet_options["free_bytes"] is None
                                  else round(trainer.unet_options["free_bytes"] / 2**30, 1)),
            "optimizer": type(opt).__name__,
            "adamw_fused": bool(opt.defaults.get("fused")), "adamw_foreach": opt.defaults.get("foreach"),
            "channels_last": cfg.channels_last, "compiled": cfg.compile_unet,
            "attention_processors": sorted(attention_processors(model.unet)),
            "mixed_precision": mixed_precision,
        }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return out


def bench_trainer(unet_config: dict[str, Any], *, configs, batch: int, steps: int, warmup: int, lora_rank: int,
                  device: str, mixed_precision: str, peak: float | None,
                  reference_seconds: float | None, progress=None) -> dict[str, Any]:
    """Every configuration of ``configs``; one that cannot run here (8-bit AdamW without
    bitsandbytes or CUDA) is recorded as ``{"skipped": reason}``, one that fails as ``{"error": ...}``.
    ``progress`` is called with the results so far after each configuration."""
    from pogdiff.training.optimizer import adamw8bit_missing

    out: dict[str, Any] = {}
    for name in configs:
        if TRAINER_CONFIGS[name].get("optimizer") == "adamw8bit" and adamw8bit_missing():
            out[name] = {"skipped": " and ".join(adamw8bit_missing())}
            continue
        logger.info("trainer configuration %r", name)
        try:
            r = time_trainer(name, unet_config, batch=batch, steps=SHORT_CONFIGS.get(name, steps), warmup=warmup,
                             lora_rank=lora_rank, device=device, mixed_precision=mixed_precision)
        except Exception as exc:  # noqa: BLE001 - one configuration failing must not lose the others' figures
            logger.exception("trainer configuration %r failed", name)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        r["share_of_bf16_peak"] = (round(r["achieved_tflops"] / peak, 4)
                                   if peak and r["achieved_tflops"] is not None else None)
        r["ratio_to_diffusers_example"] = (round(r["seconds_per_step"] / reference_seconds, 3)
                                           if reference_seconds else None)
        out[name] = r
        if progress is not None:
            progress(out)
    plain = out.get("plain", {}).get("seconds_per_step")
    for r in out.values():
        if plain and "seconds_per_step" in r:
            r["ratio_to_plain"] = round(r["seconds_per_step"] / plain, 3)
    return out


def bench_prepare(pipeline: str, *, device: str, n: int = 16) -> dict[str, Any]:
    """The Neighbours tab's sd15 preparation: :func:`pogdiff.method.prepare.encoder_parts` of a diffusers
    Stable Diffusion folder on ``device`` (CLIP and VAE), then :func:`pogdiff.method.prepare.prepare_data`
    and the neighbour table of ``n`` synthetic images, as the tab calls them."""
    import types

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from pogdiff.method import prepare
    from pogdiff.config import PsiConfig, model_preset

    from diffusers import UNet2DConditionModel

    size = int(AutoencoderKL.load_config(pipeline, subfolder="vae")["sample_size"])
    width = int(UNet2DConditionModel.load_config(pipeline, subfolder="unet")["cross_attention_dim"])
    cfg = model_preset("sd15", pretrained=pipeline, resolution=size, cross_attention_dim=width)
    rng = np.random.default_rng(0)
    subjects = [f"person {i % 4}" for i in range(n)]
    ds = types.SimpleNamespace(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                               captions=[f"a photo of {s}" for s in subjects], subjects=subjects)
    t0 = time.perf_counter()
    parts = prepare.encoder_parts(cfg, device=device)
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        data = prepare.prepare_data(ds, parts, PsiConfig(), cache_dir=cache, need_table=False)
        table = prepare.neighbour_table(data.text.pooled.numpy(), data.image_feats, PsiConfig(), subjects,
                                        clean=data.x0, cache_dir=cache)
    done = time.perf_counter()
    return {"pipeline": pipeline, "device": str(parts.device), "images": n, "resolution": size,
            "x0_shape": list(data.x0.shape), "token_states_shape": list(data.text.tokens.shape),
            "finite": bool(torch.isfinite(data.x0).all()) and bool(np.isfinite(table.psi).all()),
            "load_seconds": round(loaded - t0, 2), "prepare_seconds": round(done - loaded, 2)}
