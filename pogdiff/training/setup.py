"""What a run checks before it sets anything up (README "Training options"): its
:class:`~pogdiff.config.TrainConfig` against the data, the lr schedules diffusers knows, and what its
optimizer and tracker need installed.
"""

from __future__ import annotations

import dataclasses

from pogdiff.config import TrainConfig
from pogdiff.training.accelerator import check_tracker_available
from pogdiff.training.optimizer import check_optimizer_available


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
