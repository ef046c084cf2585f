"""What a training step needs of the device's memory, and how the model is laid out for it
(README "Training options"): the step's memory estimate, gradient checkpointing decided from the
free memory, the channels-last format, and the dtype of a LoRA model's frozen weights.
"""

from __future__ import annotations

import logging

import torch

from pogdiff.config import CHECKPOINTING, TrainConfig

logger = logging.getLogger(__name__)


def frozen_weight_dtype(model, mixed_precision: str) -> torch.dtype | None:
    """The dtype for a LoRA model's frozen weights under mixed precision (None: leave them).

    As diffusers' LoRA training scripts do, frozen weights are stored in the autocast dtype and
    only the LoRA parameters stay float32: no cast in every forward, half the weight memory
    (BENCHMARKS.md "GPU" times the step with float32 frozen weights beside it).
    """
    if not getattr(model, "is_lora", False):
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(mixed_precision))


# ------------------------------------------------------------------ gradient checkpointing
# Bytes a UNet forward pass keeps for the backward pass, per sample, per latent pixel and per unit of
# activation width (activation_units), with 2-byte (bf16 / fp16) activations. Calibrated on the
# SD-1.5 UNet step without checkpointing of BENCHMARKS.md "GPU" (9.6 GiB peak at batch 8 and 64 x 64
# latents, 1.7 GiB of it the frozen bf16 weights: 7.9 GiB / (8 x 4096 x 2900 units) = 89 B), rounded up.
ACTIVATION_BYTES_PER_UNIT = 96
# "auto" turns checkpointing on when the free memory is below the estimate times this margin
# (allocator fragmentation, cuDNN / attention workspaces).
CHECKPOINTING_MARGIN = 1.25


def activation_units(unet_config) -> float:
    """Activation width of a UNet per latent pixel: ``sum_i c_i (2 L + 1) / 4**i`` over its levels
    (``c_i`` the level's channels, ``L`` resnets per down block, one more per up block, each level
    at a quarter of the pixels of the one above). 2900 for Stable Diffusion 1.5's UNet."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    layers = layers if isinstance(layers, int) else max(layers)
    return float(sum(c * (2 * layers + 1) / 4**i for i, c in enumerate(channels)))


def step_memory_estimate(unet, *, batch_size: int, latent_pixels: int, mixed_precision: str) -> int:
    """Bytes a training step still needs once the weights are on the device, without gradient
    checkpointing: the activations kept for the backward pass (:data:`ACTIVATION_BYTES_PER_UNIT`
    per unit of :func:`activation_units`, per latent pixel and sample, doubled for float32) plus the
    gradient and the two AdamW moments of every trainable parameter."""
    from pogdiff.model.models import unwrap

    base = unwrap(unet)
    half = str(mixed_precision) in ("fp16", "bf16")
    activations = ACTIVATION_BYTES_PER_UNIT * (1 if half else 2) * activation_units(base.config)
    activations *= batch_size * latent_pixels
    trainable = sum(p.numel() * p.element_size() for p in base.parameters() if p.requires_grad)
    return int(activations + 3 * trainable)


def free_device_memory(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA ``device`` (``torch.cuda.mem_get_info``); None for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def needs_gradient_checkpointing(choice: str, *, free_bytes: int | None, needed_bytes: int,
                                 margin: float = CHECKPOINTING_MARGIN) -> bool:
    """Whether a run uses gradient checkpointing (README "Training options", ``--gradient-checkpointing``).

    ``"on"`` / ``"off"`` as asked; ``"auto"``: on only when the device's ``free_bytes`` are below
    ``needed_bytes`` (:func:`step_memory_estimate`) times ``margin``; off when the device reports no
    free memory (``None``: a CPU, whose step is not limited by a card's memory).
    """
    if choice not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(map(repr, CHECKPOINTING))}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return free_bytes is not None and free_bytes < needed_bytes * margin


def apply_unet_options(model, cfg: TrainConfig, *, device: torch.device | str, mixed_precision: str,
                       latent_pixels: int) -> dict:
    """Set up ``model.unet`` for training on ``device``: gradient checkpointing as
    ``model.config.gradient_checkpointing`` decides (:func:`needs_gradient_checkpointing`) and the
    channels-last memory format when ``cfg.channels_last``. Returns what was decided (the estimate
    and the free memory it was compared with, in bytes)."""
    unet = model.unet
    choice = getattr(model.config, "gradient_checkpointing", "off")
    needed = step_memory_estimate(unet, batch_size=cfg.batch_size, latent_pixels=latent_pixels,
                                  mixed_precision=mixed_precision)
    free = free_device_memory(device)
    use = needs_gradient_checkpointing(choice, free_bytes=free, needed_bytes=needed)
    if getattr(unet, "_supports_gradient_checkpointing", False) and bool(unet.is_gradient_checkpointing) != use:
        (unet.enable_gradient_checkpointing if use else unet.disable_gradient_checkpointing)()
    if choice == "auto":
        logger.info("gradient checkpointing %s: the step needs about %.1f GiB, %s", "on" if use else "off",
                    needed / 2**30, "not on a CUDA device" if free is None else f"{free / 2**30:.1f} GiB free")
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    return {"gradient_checkpointing": use, "choice": choice, "estimated_bytes": needed, "free_bytes": free}
