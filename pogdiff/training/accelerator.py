"""The ``accelerate`` object of a run: its processes (gloo on CPUs under ``torchrun`` / ``accelerate
launch``), its mixed precision, and the tracker it logs to (README "Training options").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pogdiff.config import TRACKERS, TrainConfig

logger = logging.getLogger(__name__)


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
