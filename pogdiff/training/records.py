"""What a run leaves behind, and how the :class:`~pogdiff.training.trainer.Trainer` writes and reads it.

:class:`StepInfo` is one step's report (the callback's argument and a line of ``history.jsonl``),
:class:`TrainResult` what a finished run returns, :class:`NonFiniteError` why a run stopped early.
:class:`RunFiles` is the run folder as the Trainer keeps it: the history file equal to the steps
done, the run's record (``run.json``, :mod:`pogdiff.training.run_folder`) and the checkpoints written;
what a checkpoint holds besides the weights is :mod:`pogdiff.training.state`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pogdiff.model import checkpoints
from pogdiff.training import run_folder
from pogdiff.config import TrainConfig, to_dict

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
    """``StepInfo`` of each row of :func:`pogdiff.training.run_folder.read_history` (unknown keys ignored)."""
    known = {f.name for f in dataclasses.fields(StepInfo)}
    return [StepInfo(**{k: v for k, v in h.items() if k in known}) for h in rows]


class RunFiles:
    """The run folder as a run keeps it: ``history.jsonl`` equal to the steps done, the record
    ``run.json`` and the checkpoints. Only the main process writes (``is_main``).

    :param model: the model whose checkpoints are written (its config goes into the record).
    :param fingerprint: what a resume must not change (:func:`pogdiff.training.run_folder.run_fingerprint`),
        kept in the record and in every checkpoint.
    """

    def __init__(self, run_dir: str | Path, *, model, cfg: TrainConfig, is_main: bool,
                 fingerprint: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.model, self.cfg, self.is_main = model, cfg, is_main
        self.fingerprint = fingerprint
        self.history_written = 0  # rows of the history already in history.jsonl

    def write_checkpoint(self, step: int, *, optimizer, ema, extra: dict, extra_tensors: dict) -> Path:
        """Write ``checkpoint-{step}`` (:func:`pogdiff.model.checkpoints.save_checkpoint`, keeping at most
        ``checkpoints_total_limit``) and note it in the record; main process only."""
        path = checkpoints.save_checkpoint(
            self.run_dir, step, self.model, train_cfg=self.cfg, optimizer=optimizer,
            ema_unet=ema, extra=extra, extra_tensors=extra_tensors, keep=self.cfg.checkpoints_total_limit,
        )
        self.write_status(steps_done=step, last_checkpoint=path.name)
        return path

    def history_upto(self, step: int, extra: dict) -> list[StepInfo]:
        """The history of a run resumed at ``step``: from ``history.jsonl`` up to that step (rows
        written after it are dropped when the loop starts), else from a checkpoint's ``extra``
        written before the history had its own file."""
        rows = run_folder.read_history(self.run_dir, upto=step)
        if len(rows) != step and "history" in extra:
            rows = [h for h in extra["history"] if int(h["step"]) <= step]
        return history_from_rows(rows)

    def start_history(self, history: Sequence[StepInfo]) -> None:
        """Make ``history.jsonl`` hold exactly ``history`` (drops rows of steps past a resumed
        checkpoint; converts a run whose history was kept in its checkpoints)."""
        if self.is_main:
            run_folder.write_history(self.run_dir, [dataclasses.asdict(h) for h in history])
        self.history_written = len(history)

    def flush_history(self, history: Sequence[StepInfo]) -> None:
        """Append the steps of ``history`` not yet written to ``history.jsonl`` (main process only)."""
        new = history[self.history_written:]
        if self.is_main and new:
            run_folder.append_history(self.run_dir, [dataclasses.asdict(h) for h in new])
        self.history_written = len(history)

    def write_status(self, **fields) -> None:
        """Merge ``fields`` into the record with the run's configs and fingerprint (main process only;
        a failed write is logged, never raised)."""
        if not self.is_main:
            return
        try:
            run_folder.update_record(self.run_dir, max_steps=self.cfg.max_steps, method=self.cfg.method,
                                     fingerprint=self.fingerprint, model_cfg=to_dict(self.model.config),
                                     train_cfg=to_dict(self.cfg), **fields)
        except OSError:
            logger.warning("could not write the status file of %s", self.run_dir, exc_info=True)
