"""The optimizer of a run (README "Training options"): AdamW with the kernel ``TrainConfig.adamw_kernel``
chooses, or bitsandbytes' 8-bit AdamW where it can run; refused in words before any work when it cannot.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from pogdiff.config import ADAMW_KERNELS, OPTIMIZERS, TrainConfig


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
