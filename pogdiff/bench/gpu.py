"""The GPU benchmark: an SD-1.5-sized UNet LoRA step at 512 px in bf16 (BENCHMARKS.md "GPU").

``python -m pogdiff bench gpu`` (CUDA only; on CPU it says so and exits cleanly, or with ``--tiny``
runs every configuration on a tiny random UNet). The UNet is built from its config written out
here, with random weights: no download. Two kinds of step are timed:

- hand-written steps (``results``): the diffusers LoRA example's step, the reference, and the
  earlier hand-written copies of ours;
- the project's :class:`pogdiff.training.trainer.Trainer` (``trainer``): the model, cached latents and text
  states, optimizer and mixed precision of ``pogdiff train --preset sd15``, with the plain and the
  PoGDiff objectives, and one configuration per speed option (README "Training options").

``scripts/gpu_check.sh`` runs all of it, with 8-bit AdamW and the Neighbours tab's sd15
preparation, in one go.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pogdiff.bench.gpu_trainer import CAPTION_TOKENS, TRAIN_ROWS, TRAINER_CONFIGS, bench_prepare, bench_trainer
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

    from pogdiff.method.losses import mse_loss, pogdiff_loss

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
    it up: ``pogdiff.training.memory.frozen_weight_dtype``)."""
    import torch
    from diffusers import UNet2DConditionModel

    from pogdiff.model.models import add_lora

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
    from pogdiff.model.models import count_parameters

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
