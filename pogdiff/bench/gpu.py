"""The GPU benchmark: an SD-1.5-sized UNet LoRA step at 512 px in bf16 (BENCHMARKS.md "GPU").

``python -m pogdiff bench gpu`` (CUDA only; on CPU it says so and exits cleanly). The UNet is built
from its config written out here, with random weights: no download.
"""

from __future__ import annotations

import logging
import sys
import time
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


def bench_gpu(*, batch: int = 8, steps: int = 10, warmup: int = 3, lora_rank: int = 4) -> dict[str, Any]:
    """SD-1.5 UNet LoRA steps at 512 px (64x64 latents) in bf16; ``{"skipped": "no CUDA"}`` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA", "message": "no CUDA device: the gpu benchmark needs an NVIDIA GPU; "
                "run it on a CUDA machine", **machine()}
    from pogdiff.models import count_parameters

    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0)
    peak = bf16_peak_tflops(name)
    results = {}
    for mode in ("diffusers example", "plain", "pogdiff"):
        unet = lora_unet(SD15_UNET_CONFIG, mode, rank=lora_rank, device="cuda")
        unet.train()
        r = _gpu_steps(unet, mode, batch=batch, steps=steps, warmup=warmup)
        r["share_of_bf16_peak"] = round(r["achieved_tflops"] / peak, 3) if peak else None
        r["unet_parameters_m"] = round(count_parameters(unet) / 1e6, 1)
        r["lora_parameters_m"] = round(count_parameters(unet, trainable_only=True) / 1e6, 3)
        results[mode] = r
        del unet
        torch.cuda.empty_cache()
    return {"device": name, "bf16_peak_tflops": peak, "batch": batch, "resolution": 512, "lora_rank": lora_rank,
            "timed_steps": steps, "results": results,
            "pogdiff_over_plain": round(results["plain"]["it_per_s"] / results["pogdiff"]["it_per_s"], 3),
            "torch": torch.__version__}


def add_parsers(bench) -> None:
    """Register ``gpu`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    p = bench.add_parser("gpu", help="SD-1.5-sized UNet LoRA step at 512 px, bf16 (CUDA only)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--out", default="results/gpu.json", help="JSON output")
    p.set_defaults(fn=main)


def main(args) -> int:
    """``bench gpu``: the result as one JSON line and in ``--out``; on CPU the reason on stderr."""
    result = bench_gpu(batch=args.batch_size, steps=args.steps, warmup=args.warmup)
    if "skipped" in result:
        print(result["message"], file=sys.stderr)
    write_result(args.out, result)
    return 0
