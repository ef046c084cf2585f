"""What a training run sets up before its first step (README "Training options").

Config checks, the optimizer (AdamW, 8-bit AdamW), trackers, per-timestep loss weights, the run's
fingerprint (a resume with other data or settings is refused), the accelerate object, and the
global RNG states a checkpoint stores. :mod:`pogdiff.training.run` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pogdiff.config import (
    ADAMW_KERNELS,
    CHECKPOINTING,
    OPTIMIZERS,
    TRACKERS,
    ModelConfig,
    TrainConfig,
)

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003
FINGERPRINT_KEYS = ("method", "preset", "pretrained", "dataset_hash")


class RunMismatchError(ValueError):
    """The run folder holds a run with another method, preset or data."""


def frozen_weight_dtype(model, mixed_precision: str) -> torch.dtype | None:
    """The dtype for a LoRA model's frozen weights under mixed precision (None: leave them).

    As diffusers' LoRA training scripts do, frozen weights are stored in the autocast dtype and
    only the LoRA parameters stay float32: no cast in every forward, half the weight memory
    (BENCHMARKS.md "GPU" measured the fp32-weights step at about half the speed).
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


def check_train_config(cfg: TrainConfig, n_samples: int) -> None:
    """Validate a TrainConfig once, with messages that name the bad value and what is allowed.

    The numbers and choices are checked by ``TrainConfig`` itself (again here, for a config edited
    in place); this adds what depends on the data, the lr schedules diffusers knows and what the
    optimizer and tracker need installed.
    """
    dataclasses.replace(cfg)
    if cfg.psi.sampling not in ("similarity", "nearest"):
        raise ValueError(f"psi sampling must be 'similarity' or 'nearest', got {cfg.psi.sampling!r}")
    if cfg.method == "pogdiff" and n_samples < 2:
        raise ValueError("PoGDiff needs at least 2 training images to find neighbours")
    from diffusers.optimization import SchedulerType

    # Schedules that are a function of the step alone (what resuming and fast-forwarding assume).
    names = [t.value for t in SchedulerType if t.value not in ("reduce_lr_on_plateau", "piecewise_constant")]
    if cfg.lr_scheduler not in names:
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}; choose one of {', '.join(names)}")
    check_optimizer_available(cfg.optimizer)
    check_tracker_available(cfg.report_to)


# ------------------------------------------------------------------------- optimizer, trackers
def adamw8bit_missing() -> list[str]:
    """What ``optimizer="adamw8bit"`` lacks on this machine (empty when it can run)."""
    missing = []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("bitsandbytes is not installed")
    if not torch.cuda.is_available():
        missing.append("CUDA is not available")
    return missing


def _adamw8bit_error(missing: Sequence[str]) -> ValueError:
    return ValueError(
        f"optimizer 'adamw8bit' needs bitsandbytes and a CUDA GPU, but {' and '.join(missing)}: install "
        "bitsandbytes (pip install bitsandbytes) on a CUDA machine, or use optimizer 'adamw' (--optimizer adamw)"
    )


def check_optimizer_available(name: str) -> None:
    """Refuse an unknown optimizer, or 8-bit AdamW where it cannot run, before any work is done."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit":
        missing = adamw8bit_missing()
        if missing:
            raise _adamw8bit_error(missing)


def adamw_kernel_options(choice: str, device_type: str) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments of ``TrainConfig.adamw_kernel`` on a device type.

    ``"fused"``: one fused kernel (``fused=True``); ``"foreach"``: multi-tensor kernels;
    ``"loop"``: one parameter at a time; ``"auto"``: fused on CUDA (foreach where this torch has
    no fused AdamW), elsewhere torch's own default (the for-loop on a CPU, so CPU runs compute
    what they computed before the option existed).
    """
    if choice not in ADAMW_KERNELS:
        raise ValueError(f"adamw_kernel must be one of {', '.join(map(repr, ADAMW_KERNELS))}, got {choice!r}")
    has_fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    if choice == "auto":
        if device_type != "cuda":
            return {}
        choice = "fused" if has_fused else "foreach"
    if choice == "fused":
        if not has_fused:
            raise ValueError(f"adamw_kernel 'fused' needs torch >= 2.0 (this is {torch.__version__}): "
                             "use adamw_kernel 'foreach' or 'auto'")
        return {"fused": True}
    if choice == "foreach":
        return {"foreach": True}
    return {"foreach": False}


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig,
                    device: torch.device | str) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` with the kernel of ``cfg.adamw_kernel`` (:func:`adamw_kernel_options`),
    or ``bitsandbytes.optim.AdamW8bit`` for ``optimizer="adamw8bit"`` (README "Training options");
    the 8-bit one needs the parameters on a CUDA device."""
    check_optimizer_available(cfg.optimizer)
    if cfg.optimizer == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise _adamw8bit_error([f"the model is on {device}, not on a CUDA device"])
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    kernel = adamw_kernel_options(getattr(cfg, "adamw_kernel", "auto"), torch.device(device).type)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **kernel)


def _tensorboard_available() -> bool:
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())


def check_tracker_available(report_to: str) -> None:
    """Refuse an unknown tracker, or tensorboard when it is not installed, before any work is done."""
    if report_to not in TRACKERS:
        raise ValueError(f"unknown report_to {report_to!r}; choose one of {', '.join(TRACKERS)}")
    if report_to == "tensorboard" and not _tensorboard_available():
        raise ValueError("report_to 'tensorboard' needs the tensorboard package, which is not installed: "
                         "pip install tensorboard (pinned in requirements-dev.txt), or use report_to 'none'")


TRACKER_PROJECT = "pogdiff"  # tensorboard event files go to <run>/logs/<TRACKER_PROJECT>/


def tracker_options(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """``Accelerator`` keyword arguments for ``cfg.report_to`` (empty for "none")."""
    if cfg.report_to == "none":
        return {}
    return {"log_with": cfg.report_to, "project_dir": str(Path(run_dir) / "logs")}


def eps_loss_weights(t: torch.Tensor, scheduler, *, snr_gamma: float = 0.0) -> torch.Tensor | None:
    """Per-sample weights ``w(t)`` [N] for the eps-space losses of :mod:`pogdiff.method.losses`.

    The losses compare eps-predictions (the UNet output converted by
    :func:`pogdiff.model.models.output_to_eps`). ``w`` turns that squared error into the squared error of
    the model's own prediction type, ``snr = abar / (1 - abar)``:

    - ``epsilon``: ``w = 1``;
    - ``v_prediction``: ``eps_err = sqrt(abar) v_err``, so ``w = 1 / abar = (snr + 1) / snr``;
    - ``sample``: ``eps_err = -sqrt(abar / (1 - abar)) x0_err``, so ``w = 1 / snr``.

    With ``snr_gamma > 0`` the Min-SNR weight of that prediction type multiplies it (as in
    diffusers' training scripts: ``min(snr, gamma) / snr`` for epsilon, ``/ (snr + 1)`` for v,
    ``min(snr, gamma)`` for sample), which in eps space is ``min(snr, gamma) / snr`` for all three.
    Returns None when every weight is 1 (epsilon without Min-SNR).
    """
    from diffusers.training_utils import compute_snr

    kind = scheduler.config.prediction_type
    if kind == "epsilon" and not snr_gamma:
        return None
    snr = compute_snr(scheduler, t.long())
    native = {"epsilon": torch.ones_like(snr), "v_prediction": (snr + 1) / snr, "sample": 1 / snr}
    if kind not in native:
        raise ValueError(f"unsupported prediction_type {kind!r}; supported: {', '.join(native)}")
    weight = native[kind]
    if snr_gamma:
        clipped = torch.clamp(snr, max=snr_gamma)
        min_snr = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
        weight = weight * min_snr[kind]
    return weight.float()


def dataset_hash(dataset) -> str:
    """sha256 (first 16 hex digits) of a set's pixels, captions and subjects."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(dataset.images).tobytes())
    for text in (*dataset.captions, "\x00", *dataset.subjects):
        digest.update(text.encode() + b"\x00")
    return digest.hexdigest()[:16]


def run_fingerprint(dataset, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """What a resume must not change: method, preset, pretrained pipeline and the data's hash
    (``data`` and ``n_images`` are kept for the message only)."""
    return {
        "method": train_cfg.method, "preset": model_cfg.preset, "pretrained": model_cfg.pretrained,
        "dataset_hash": dataset_hash(dataset), "n_images": len(dataset.captions),
        "data": str(getattr(dataset, "root", "")),
    }


def check_same_run(run_dir: Path, saved: dict, now: dict) -> None:
    """Refuse to resume when a fingerprint field differs, naming each difference."""
    diffs = [f"{k} {saved[k]!r} in the run folder, {now[k]!r} now" for k in FINGERPRINT_KEYS
             if k in saved and saved[k] != now.get(k)]
    if diffs:
        hint = ""
        if any(k.startswith("dataset") for k in FINGERPRINT_KEYS if k in saved and saved[k] != now.get(k)):
            hint = f" (run data: {saved.get('data', '?')}, {saved.get('n_images', '?')} images; now: {now.get('data')}, {now.get('n_images')} images)"
        raise RunMismatchError(
            f"{run_dir} holds another run: {'; '.join(diffs)}{hint}. Resuming would mix them: start a new "
            "run (--no-resume, or resume=False, moves the old checkpoints aside) or choose another run folder"
        )


def accelerate_mixed_precision() -> str | None:
    """The mixed precision asked of ``accelerate``: ``ACCELERATE_MIXED_PRECISION`` (set by
    ``accelerate launch``), else the default ``accelerate config`` file; None when neither says."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if not value:
        try:
            from accelerate.commands.config.config_args import (
                default_config_file,
                load_config_from_file,
            )

            if Path(default_config_file).is_file():
                value = getattr(load_config_from_file(default_config_file), "mixed_precision", None)
        except Exception:  # noqa: BLE001 - an unreadable accelerate config is the same as none
            logger.debug("could not read the accelerate config file", exc_info=True)
            value = None
    value = str(value).lower() if value else None
    return value if value in ("no", "fp16", "bf16") else None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def make_accelerator(mixed_precision: str, **options):
    """An ``Accelerator``; under ``torchrun`` / ``accelerate launch`` without a GPU, CPU processes
    join one gloo process group (instead of each training alone into the same run folder).
    ``options`` go to ``Accelerator`` (the tracker's ``log_with`` / ``project_dir``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    multi = _world_size() > 1
    # Inside one process (app, tests) successive runs may ask for different precisions.
    if PartialState._shared_state and PartialState().num_processes == 1 and not multi:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=multi and not torch.cuda.is_available(), **options)


def own_storage(module: torch.nn.Module) -> None:
    """Give every parameter and buffer a fresh contiguous copy of its data.

    Weights loaded from safetensors may live in differently aligned memory than freshly made
    ones, and CPU kernels may then pick another summation order (differences of ~1e-6): with
    fresh copies a resumed run computes exactly what the uninterrupted run computed.
    """
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone(memory_format=torch.contiguous_format)


def seed_of(*parts: int) -> int:
    """A 64-bit seed mixing any number of non-negative-or-not integers (no stride limits)."""
    entropy = [int(x) % 2**64 for x in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Global RNG states: JSON part (python, numpy scalars) and tensor part (torch, numpy key)."""
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                             float(np_state[4])]}
    return meta, tensors


def set_rng_state(meta: dict | None, tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if meta:
        py = meta["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "rng.numpy" in tensors:
            name, pos, has_gauss, cached = meta["numpy"]
            np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
