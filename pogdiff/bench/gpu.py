"""The GPU benchmark: an SD-1.5-sized UNet LoRA step at 512 px in bf16 (BENCHMARKS.md "GPU").

``python -m pogdiff bench gpu`` (CUDA only; on CPU it says so and exits cleanly, or with ``--tiny``
runs every configuration on a tiny random UNet). The UNet is built from its config written out
here, with random weights: no download. Two kinds of step are timed:

- hand-written steps (``results``): the diffusers LoRA example's step, the reference, and the
  earlier hand-written copies of ours;
- the project's :class:`pogdiff.trainer.Trainer` (``trainer``): the model, cached latents and text
  states, optimizer and mixed precision of ``pogdiff train --preset sd15``, with the plain and the
  PoGDiff objectives, and one configuration per speed option (README "Training options").

``scripts/gpu_check.sh`` runs all of it, with 8-bit AdamW and the Neighbours tab's sd15
preparation, in one go.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pogdiff.bench.output import machine, write_result

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- gpu
# Stable Diffusion 1.5's UNet (unet/config.json of the v1-5 pipeline), written out: no download.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# Dense bf16 tensor-core peaks from the vendor data sheets, TFLOP/s (no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0, "T4": 65.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak by name (first matching key, most specific first), else None."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def _gpu_steps(unet, mode: str, *, batch: int, steps: int, warmup: int, lr: float = 1e-4,
               device: str = "cuda", latent: int = 64, tokens: int = 77) -> dict[str, Any]:
    """Time ``steps`` LoRA training steps of ``mode`` ("diffusers example", "plain", "pogdiff")."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from pogdiff.losses import mse_loss, pogdiff_loss

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dim = unet.config.cross_attention_dim
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(batch, unet.config.in_channels, latent, latent, device=dev, generator=gen)
    ctx = torch.randn(batch, tokens, dim, device=dev, generator=gen)
    ctx_nb = torch.randn(batch, tokens, dim, device=dev, generator=gen)
    psi = torch.full((batch,), 0.5, device=dev)

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        if mode == "diffusers example":  # frozen bf16 weights, fp32 LoRA, no autocast
            pred = unet(x_t.bfloat16(), t, ctx.bfloat16()).sample
            loss = F.mse_loss(pred.float(), noise.float())
        else:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                pred = unet(x_t, t, ctx).sample
                if mode == "pogdiff":
                    with torch.no_grad():
                        eps_nb = unet(x_t, t, ctx_nb).sample
                    loss = pogdiff_loss(pred.float(), noise, eps_nb.float(), psi)["loss"].mean()
                else:
                    loss = mse_loss(pred.float(), noise)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    return {"it_per_s": round(1 / sec, 3), "seconds_per_step": round(sec, 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "tflop_per_step": round(flops / 1e12, 3), "achieved_tflops": round(flops / sec / 1e12, 1)}


def lora_unet(config: dict[str, Any], mode: str, *, rank: int, device: str, seed: int = 0):
    """A randomly initialised UNet with frozen weights and LoRA adapters, set up as ``mode`` does:
    the diffusers example keeps frozen weights in bf16 and LoRA in fp32 without autocast; ours does
    the same under bf16 autocast with gradient checkpointing (the sd15 preset, as the trainer sets
    it up: ``training.frozen_weight_dtype``)."""
    import torch
    from diffusers import UNet2DConditionModel

    from pogdiff.models import add_lora

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds, not a minute, for 860M parameters
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    if mode == "diffusers example":
        unet.to(device, dtype=torch.bfloat16)
        add_lora(unet, rank)
        for p in unet.parameters():  # the example's cast_training_params: LoRA in fp32
            if p.requires_grad:
                p.data = p.data.float()
    else:  # the trainer under bf16 mixed precision: frozen weights in bf16, LoRA in fp32, checkpointing
        unet.to(device, dtype=torch.bfloat16)
        add_lora(unet, rank)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        unet.enable_gradient_checkpointing()
    return unet.train()


def bench_gpu(*, batch: int = 8, steps: int = 10, warmup: int = 3, lora_rank: int = 4,
              unet_config: dict[str, Any] | None = None, device: str = "cuda") -> dict[str, Any]:
    """The hand-written steps: SD-1.5 UNet LoRA steps at 512 px (64x64 latents) in bf16;
    ``{"skipped": "no CUDA"}`` without a GPU (unless ``device`` is "cpu": the CPU check)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA", "message": "no CUDA device: the gpu benchmark needs an NVIDIA GPU; "
                "run it on a CUDA machine", **machine()}
    from pogdiff.models import count_parameters

    unet_config = unet_config or SD15_UNET_CONFIG
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = bf16_peak_tflops(name) if cuda else None
    results = {}
    for mode in ("diffusers example", "plain", "pogdiff"):
        unet = lora_unet(unet_config, mode, rank=lora_rank, device=device)
        unet.train()
        r = _gpu_steps(unet, mode, batch=batch, steps=steps, warmup=warmup, device=device,
                       latent=unet_config["sample_size"], tokens=CAPTION_TOKENS)
        r["share_of_bf16_peak"] = round(r["achieved_tflops"] / peak, 3) if peak else None
        r["unet_parameters_m"] = round(count_parameters(unet) / 1e6, 1)
        r["lora_parameters_m"] = round(count_parameters(unet, trainable_only=True) / 1e6, 3)
        results[mode] = r
        del unet
        if cuda:
            torch.cuda.empty_cache()
    return {"device": name, "bf16_peak_tflops": peak, "batch": batch, "resolution": 8 * unet_config["sample_size"],
            "lora_rank": lora_rank,
            "timed_steps": steps, "results": results,
            "pogdiff_over_plain": round(results["plain"]["it_per_s"] / results["pogdiff"]["it_per_s"], 3),
            "torch": torch.__version__}


# A UNet of the same block layout, small enough for a CPU (``--tiny``: the CPU check of every path).
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 8, "attention_head_dim": 2,
    "layers_per_block": 1, "norm_num_groups": 4, "in_channels": 4, "out_channels": 4, "sample_size": 8,
}
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

        from pogdiff.text import TextEmbeddings

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
    """A :class:`pogdiff.models.DiffusionModel` as the sd15 preset builds it (LoRA on the attention
    projections, DDPM scaled-linear schedule, no caption mask), around a random UNet of
    ``unet_config`` made on ``device``; captions come from :class:`RandomStates` and there is no
    VAE (the trainer reads cached latents only). Its ``resolution`` is the latent size."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pogdiff.config import model_preset
    from pogdiff.models import add_lora, from_parts

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
    """:class:`pogdiff.prepare.TrainData` of a long-tailed synthetic set (``CLASS_COUNTS``): latents
    ``[N, 4, h, w]`` drawn around one mean per class, captions encoded once, the neighbour table of
    the default PsiConfig built by :func:`pogdiff.prepare.neighbour_table`: the cached tensors a run
    reads, without images, VAE or CLIP."""
    import torch

    from pogdiff.config import PsiConfig
    from pogdiff.prepare import TrainData, neighbour_table, similarity_features

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

    from pogdiff.models import attention_processors
    from pogdiff.trainer import Trainer

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
            terms, (_, share) = trainer.run_step()
            trainer.step += 1
            active.append(share)
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
    from pogdiff.train_setup import adamw8bit_missing

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
    """The Neighbours tab's sd15 preparation: :func:`pogdiff.prepare.encoder_parts` of a diffusers
    Stable Diffusion folder on ``device`` (CLIP and VAE), then :func:`pogdiff.prepare.prepare_data`
    and the neighbour table of ``n`` synthetic images, as the tab calls them."""
    import types

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from pogdiff import prepare
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


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table: every step, s/step, ratios, TFLOP, share of peak, memory."""
    rows = ["| step | s/step | / example | / plain | TFLOP/step | share of bf16 peak | peak GiB | psi rows | "
            "checkpointing |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def cell(v, fmt="{}"):
        return "" if v is None else fmt.format(v)

    example = result.get("results", {}).get("diffusers example", {}).get("seconds_per_step")
    for name, r in result.get("results", {}).items():
        rows.append(f"| hand-written: {name} | {r['seconds_per_step']} | "
                    f"{cell(round(r['seconds_per_step'] / example, 3) if example else None)} | | "
                    f"{r['tflop_per_step']} | {cell(r.get('share_of_bf16_peak'))} | {cell(r['peak_memory_gib'])} | | |")
    for name, r in result.get("trainer", {}).items():
        if "seconds_per_step" not in r:
            rows.append(f"| trainer: {name} | {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        rows.append(f"| trainer: {name} | {r['seconds_per_step']} | {cell(r['ratio_to_diffusers_example'])} | "
                    f"{cell(r.get('ratio_to_plain'))} | {cell(r['tflop_per_step'])} | {cell(r['share_of_bf16_peak'])} | "
                    f"{cell(r['peak_memory_gib'])} | {r['psi_active_share']} | "
                    f"{'on' if r['gradient_checkpointing'] else 'off'} |")
    prep = result.get("prepare")
    if prep:
        rows.append("")
        rows.append(f"Neighbours tab sd15 preparation: {prep}")
    return "\n".join(rows)


def run_all(*, tiny: bool = False, batch: int = 8, steps: int = 10, warmup: int = 3, lora_rank: int = 4,
            configs=None, prepare_pipeline: str | None = None, progress=None) -> dict[str, Any]:
    """The hand-written steps and every trainer configuration (``tiny``: the tiny random UNet on
    whatever device there is, the CPU check), and the Neighbours tab's preparation when
    ``prepare_pipeline`` names a Stable Diffusion folder. ``progress`` is called with the result so
    far after each trainer configuration (the command writes it to ``--out``: a run cut short keeps
    what it measured)."""
    import torch

    names = list(TRAINER_CONFIGS) if configs is None else list(configs)
    unknown = [c for c in names if c not in TRAINER_CONFIGS]
    if unknown:
        raise ValueError(f"unknown trainer configuration(s) {unknown}; choose from {list(TRAINER_CONFIGS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        return {"skipped": "no CUDA", "message": "no CUDA device: the gpu benchmark needs an NVIDIA GPU; "
                "run it on a CUDA machine (or pass --tiny for the CPU check on a tiny random UNet)", **machine()}
    device = "cuda" if cuda else "cpu"
    unet_config = TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG
    mixed_precision = "bf16" if cuda else "no"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    result = bench_gpu(batch=batch, steps=steps, warmup=warmup, lora_rank=lora_rank, unet_config=unet_config,
                       device=device)
    reference = result["results"]["diffusers example"]["seconds_per_step"]
    result.update(unet="tiny random" if tiny else "SD-1.5 config, random weights",
                  trainer_mixed_precision=mixed_precision, caption_tokens=CAPTION_TOKENS, train_rows=TRAIN_ROWS)
    trainer = bench_trainer(unet_config, configs=names, batch=batch, steps=steps, warmup=warmup,
                            lora_rank=lora_rank, device=device, mixed_precision=mixed_precision,
                            peak=result["bf16_peak_tflops"], reference_seconds=reference,
                            progress=None if progress is None else (lambda done: progress({**result, "trainer": done})))
    result["trainer"] = trainer
    for key, (a, b) in {"trainer_plain_over_example": ("plain", None),
                        "trainer_pogdiff_over_plain": ("pogdiff", "plain")}.items():
        top = trainer.get(a, {}).get("seconds_per_step")
        bottom = reference if b is None else trainer.get(b, {}).get("seconds_per_step")
        result[key] = round(top / bottom, 3) if top and bottom else None
    if prepare_pipeline:
        try:
            result["prepare"] = bench_prepare(prepare_pipeline, device=device)
        except Exception as exc:  # noqa: BLE001 - reported, the timings above stay
            logger.exception("the Neighbours tab preparation failed")
            result["prepare"] = {"pipeline": prepare_pipeline, "error": f"{type(exc).__name__}: {exc}"}
    return result


def add_parsers(bench) -> None:
    """Register ``gpu`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    p = bench.add_parser("gpu", help="SD-1.5-sized UNet LoRA step at 512 px, bf16 (CUDA only)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help="trainer configurations to time (default: all of pogdiff.bench.gpu.TRAINER_CONFIGS)")
    p.add_argument("--prepare-pipeline", default=None,
                   help="a local diffusers Stable Diffusion folder: also time the Neighbours tab's sd15 preparation")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random UNet instead of SD-1.5's, on CUDA or the CPU (the check of every path)")
    p.add_argument("--out", default="results/gpu.json", help="JSON output")
    p.set_defaults(fn=main)


def main(args) -> int:
    """``bench gpu``: the table of steps, the result as one JSON line and in ``--out``; on CPU
    without ``--tiny`` the reason on stderr."""
    def partial(so_far: dict[str, Any]) -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**so_far, "partial": True}, indent=2, sort_keys=True) + "\n")

    result = run_all(tiny=args.tiny, batch=args.batch_size, steps=args.steps, warmup=args.warmup,
                     configs=args.configs, prepare_pipeline=args.prepare_pipeline, progress=partial)
    if "skipped" in result:
        print(result["message"], file=sys.stderr)
    else:
        print(table(result))
    write_result(args.out, result)
    return 0
