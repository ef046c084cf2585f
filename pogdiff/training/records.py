"""What a run leaves behind, and how the :class:`~pogdiff.training.trainer.Trainer` writes and reads it.

:class:`StepInfo` is one step's report (the callback's argument and a line of ``history.jsonl``),
:class:`TrainResult` what a finished run returns, :class:`NonFiniteError` why a run stopped early.
:class:`RunFiles` is the Trainer's part that touches the run folder: checkpoints written and
restored (optimizer, lr scheduler, EMA weights, RNG states), the history file kept equal to the
steps done, and the run's record (``run.json``, :mod:`pogdiff.runs.run_folder`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pogdiff.model import checkpoints
from pogdiff.runs import run_folder
from pogdiff.config import to_dict
from pogdiff.training.setup import rng_state, set_rng_state

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss term or gradient; nothing was saved from that step."""

    def __init__(self, message: str, *, step: int, term: str) -> None:
        super().__init__(message)
        self.step, self.term = step, term


@dataclass
class StepInfo:
    """What the trainer reports after every optimisation step."""

    step: int
    max_steps: int
    terms: dict[str, float]
    lr: float
    seconds_per_step: float
    eta_seconds: float
    # The objective's named statistics (pogdiff.method.objectives.Objective.terms); 0 for the methods without them.
    psi_mean: float = 0.0
    psi_active: float = 0.0  # share of batch rows that ran the neighbour forward pass
    # PoGDiff only: the PoG term's share of the loss, mean(pog) / mean(loss) over the batch.
    pog_share: float = 0.0
    # T2H only: share of batch rows whose target was transferred from a row of a larger class.
    transfer_rate: float = 0.0


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path | None
    steps_done: int
    stopped: bool
    history: list[StepInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. PoGDiff inactive on this data


def tracker_values(info: StepInfo) -> dict[str, float]:
    """The scalars sent to the tracker for one step: every loss term, lr and the psi statistics."""
    values = {k: float(v) for k, v in info.terms.items()}
    values.update(lr=float(info.lr), psi_mean=float(info.psi_mean), psi_active=float(info.psi_active),
                  pog_share=float(info.pog_share), transfer_rate=float(info.transfer_rate))
    return values


def history_from_rows(rows: Sequence[dict]) -> list[StepInfo]:
    """``StepInfo`` of each row of :func:`pogdiff.runs.run_folder.read_history` (unknown keys ignored)."""
    known = {f.name for f in dataclasses.fields(StepInfo)}
    return [StepInfo(**{k: v for k, v in h.items() if k in known}) for h in rows]


class RunFiles:
    """The Trainer's checkpoints, history and record. Mixed into :class:`~pogdiff.training.trainer.Trainer`,
    whose ``__init__`` sets what these methods read (model, optimizer, lr scheduler, EMA, accelerator,
    step, history, run folder)."""

    def _fast_forward_scheduler(self, step: int) -> None:
        """Put the lr scheduler at ``step`` (a pure function of the step for LambdaLR schedules)."""
        if step > 0:
            sched = self.lr_scheduler
            sched.last_epoch = step
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * fn(step)
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def save(self) -> Path:
        """Write ``checkpoint-{step}`` (main process; the others wait) and return its path.

        Refuses (:class:`NonFiniteError`) to write weights that are not finite.
        """
        bad = next((i for i, p in enumerate(self.params) if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise self._non_finite(f"trainable parameter {bad} holds non-finite values", "weights")
        self.accelerator.wait_for_everyone()
        path = self.run_dir / f"checkpoint-{self.step:06d}"
        self._flush_history()  # before the checkpoint: a checkpoint's steps are always in the history file
        if self.is_main:
            path = self._write_checkpoint()
            logger.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = path
        self._last_save_time = time.monotonic()
        return path

    def _write_checkpoint(self) -> Path:
        rng_meta, rng_tensors = rng_state()
        extra = {
            "fingerprint": self.fingerprint,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": rng_meta,
            "num_processes": self.num_processes,
        }
        scaler = self.accelerator.scaler
        if scaler is not None:
            extra["grad_scaler"] = {k: (v.item() if isinstance(v, torch.Tensor) else v)
                                    for k, v in scaler.state_dict().items()}
        path = checkpoints.save_checkpoint(
            self.run_dir, self.step, self.model, train_cfg=self.cfg, optimizer=self.optimizer,
            ema_unet=self.ema, extra=extra, extra_tensors=rng_tensors, keep=self.cfg.checkpoints_total_limit,
        )
        self._write_status(steps_done=self.step, last_checkpoint=path.name)
        return path

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint read by :func:`pogdiff.model.checkpoints.read_trainer_state`:
        step, history, optimizer, lr scheduler, EMA weights and global RNG states.

        The history comes from the run's ``history.jsonl`` up to the checkpoint's step (rows
        written after it are dropped when the loop starts), else from a checkpoint written before
        the history had its own file."""
        self.step = int(state["step"])
        extra = state.get("extra") or {}
        rows = run_folder.read_history(self.run_dir, upto=self.step)
        if len(rows) != self.step and "history" in extra:
            rows = [h for h in extra["history"] if int(h["step"]) <= self.step]
        self.history = history_from_rows(rows)
        checkpoints.apply_optimizer_state(self.optimizer, state)
        if "lr_scheduler" in extra:
            self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        else:
            self._fast_forward_scheduler(self.step)
        scaler = self.accelerator.scaler
        if scaler is not None and "grad_scaler" in extra:
            scaler.load_state_dict(extra["grad_scaler"])
        if self.ema is not None:
            self._restore_ema(state)
        if extra.get("num_processes", 1) != self.num_processes:
            logger.info("resuming a %s-process checkpoint on %d process(es)", extra.get("num_processes", 1),
                        self.num_processes)
        set_rng_state(extra.get("rng"), state.get("extra_tensors") or {})
        self.last_checkpoint = state.get("path")

    def _start_history(self) -> None:
        """Make ``history.jsonl`` hold exactly ``self.history`` (drops rows of steps past a resumed
        checkpoint; converts a run whose history was kept in its checkpoints)."""
        if self.is_main:
            run_folder.write_history(self.run_dir, [dataclasses.asdict(h) for h in self.history])
        self._history_written = len(self.history)

    def _flush_history(self) -> None:
        """Append the steps not yet written to ``history.jsonl`` (main process only)."""
        new = self.history[self._history_written:]
        if self.is_main and new:
            run_folder.append_history(self.run_dir, [dataclasses.asdict(h) for h in new])
        self._history_written = len(self.history)

    def _restore_ema(self, state: dict) -> None:
        try:
            shadow = checkpoints.load_ema_shadow(state["path"], self.model)
        except FileNotFoundError:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights", state["path"])
            return
        ema_state = dict(state.get("ema") or {})
        ema_state["shadow_params"] = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(shadow, self.params, strict=True)]
        self.ema.load_state_dict(ema_state)

    def _write_status(self, **fields) -> None:
        if not self.is_main:
            return
        try:
            run_folder.update_record(self.run_dir, max_steps=self.cfg.max_steps, method=self.cfg.method,
                                     fingerprint=self.fingerprint, model_cfg=to_dict(self.model.config),
                                     train_cfg=to_dict(self.cfg), **fields)
        except OSError:
            logger.warning("could not write the status file of %s", self.run_dir, exc_info=True)
