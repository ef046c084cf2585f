"""Each training objective's forward pass, in one place (README "The method").

An objective turns one micro-batch, a :class:`Batch` (rows, clean inputs, noise, timesteps, caption
dropout), into per-sample loss terms. It sees the model only through a :class:`ModelAccess`:
``predict(x_t, t, rows, drop)`` runs the UNet being trained (wrapped for several processes or not:
the objective does not care), beside class-balanced rows, the neighbour table and the noise
schedule. The trainer owns the optimizer, accumulation, mixed precision and checkpoints
(:mod:`pogdiff.training.trainer`); the loss formulas themselves are in :mod:`pogdiff.method.losses`.

- ``baseline`` and ``resample``: plain eps-MSE (``resample`` draws class-balanced batches; the
  drawing is the trainer's).
- ``cbdm``: eps-MSE plus the class-balancing regulariser towards the prediction for the same
  ``x_t`` under a caption of a class drawn uniformly.
- ``pogdiff``: the Product-of-Gaussians target built from a neighbouring caption's prediction
  for the same ``x_t`` (no gradient through it), weighted per pair by psi; the neighbour pass
  runs only for rows whose psi is above ``psi_threshold``.
- ``t2h``: T2H's head-to-tail target transfer: a row may take the noise target of another row of
  the batch, of a class at least as frequent, drawn by how likely that row is to have produced
  its noised input; no extra forward pass.

At the end, :func:`pogdiff_inactive_warning`: the plain-words warning the trainer gives when the
PoG term stays a negligible share of the loss (README "Is PoGDiff doing anything?").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pogdiff.constants import QUALITY_SUMMARY
from pogdiff.method import losses
from pogdiff.method.neighbours import NeighbourTable, expected_shift, gaussian_psi_factor, neighbour_pass_rows

Terms = dict[str, torch.Tensor]
Stats = dict[str, float]  # an objective's named statistics of one micro-batch (StepInfo fields)


@dataclass
class Batch:
    """One micro-batch, as the trainer draws it (:meth:`pogdiff.training.trainer.Trainer.sample_batch`).

    ``rows``, ``t`` and ``drop`` stay on the CPU (they index the data set and the neighbour table);
    ``x0_dev``, ``t_dev`` and ``eps_dev`` are the copies on the training device, set by :meth:`on`.

    :param rows: [B] int64 data-set rows (each row's caption and class).
    :param x0: [B x C x H x W] clean inputs (pixels or latents) of the rows.
    :param t: [B] int64 timesteps.
    :param eps: [B x C x H x W] the noise added to ``x0``.
    :param drop: [B] bool, rows whose caption is replaced by the empty one.
    """

    rows: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor
    x0_dev: torch.Tensor | None = None
    t_dev: torch.Tensor | None = None
    eps_dev: torch.Tensor | None = None

    def on(self, device: torch.device | str) -> Batch:
        """This batch with ``x0_dev``, ``t_dev`` and ``eps_dev`` on ``device``."""
        return replace(self, x0_dev=self.x0.to(device), t_dev=self.t.to(device), eps_dev=self.eps.to(device))


@dataclass
class ModelAccess:
    """What an objective may use of the trainer for one micro-batch.

    :param predict: ``(x_t, t, rows, drop) -> eps`` of the UNet being trained, for caption ``rows``
        (``drop``: rows whose caption is replaced by the empty one), with gradients.
    :param balanced_rows: ``(b, generator) -> rows`` drawn class-uniformly (CBDM).
    :param table: the neighbour table (PoGDiff), else None.
    :param betas: the noise schedule's betas (the Gaussian psi schedule).
    """

    predict: Callable[..., torch.Tensor]
    balanced_rows: Callable[[int, torch.Generator], torch.Tensor]
    table: NeighbourTable | None
    betas: torch.Tensor
    num_timesteps: int
    # ``(x_t, t, rows) -> eps`` of the frozen teacher (PsiConfig.teacher "base"), without gradients.
    predict_teacher: Callable[..., torch.Tensor] | None = None
    # [N rows of the data set] the training-set size of each row's class (T2H's head -> tail rule).
    class_count: torch.Tensor | None = None


class Objective:
    """``terms(model, batch, x_t, g) -> (per-sample terms with a "loss" key, statistics)``.

    The statistics are named floats of the micro-batch (PoGDiff: ``psi_mean``, the mean psi, and
    ``psi_active``, the share of rows that ran the neighbour pass); the trainer averages them over
    micro-batches and processes and puts them in the step's :class:`~pogdiff.training.records.StepInfo`
    under the same names, so each name must be a field of it.

    Besides the terms, an objective says what it needs (``needs_table``: the neighbour table;
    ``needs_teacher``: frozen start weights), what to add to a divergence message
    (:meth:`divergence_hint`), what to log (:meth:`log_stats`) and, from the latest steps, whether
    it is doing what it is for (:meth:`diagnose`). The trainer knows no method by name.
    """

    name = "baseline"
    needs_table = False
    needs_teacher = False

    def divergence_hint(self) -> str:
        """An extra remedy for a non-finite loss (", a smaller X"), or ''."""
        return ""

    def log_stats(self, info) -> str:
        """Method statistics of one logged step (a :class:`pogdiff.training.records.StepInfo`), or ''."""
        return ""

    def diagnose(self, history: Sequence) -> str | None:
        """A plain-words warning from the latest steps (``StepInfo``) when the objective behaves like
        another one, else None."""
        return None

    def terms(self, model: ModelAccess, batch: Batch, x_t: torch.Tensor,
              g: torch.Generator) -> tuple[Terms, Stats]:
        eps_pred = model.predict(x_t, batch.t_dev, batch.rows, batch.drop)
        return losses.mse_loss(eps_pred, batch.eps_dev), {}


class CBDM(Objective):
    """Class-Balancing Diffusion Models' regulariser (README "The method"), as its authors train it:
    the balanced caption of a class drawn uniformly, ``t/T`` weighting, the 1/4 commitment term, and
    no regulariser for a row whose caption was dropped (an unconditional prediction has no class to
    balance)."""

    name = "cbdm"

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def terms(self, model, batch, x_t, g):
        t, eps = batch.t_dev, batch.eps_dev
        eps_pred = model.predict(x_t, t, batch.rows, batch.drop)
        rows_b = model.balanced_rows(len(t), g)
        eps_pred_b = model.predict(x_t, t, rows_b, None)
        tau = self.tau * (~batch.drop).float().to(eps_pred.device)  # [B]: 0 for dropped captions
        return losses.cbdm_loss(eps_pred, eps, eps_pred_b, t, model.num_timesteps, tau=tau), {}


class PoGDiff(Objective):
    name = "pogdiff"
    needs_table = True

    def __init__(self, schedule: str, psi_threshold: float, teacher: str = "live", *, pool: str | None = None,
                 psi_max: float = 1.0, neighbour_share: float = 1.0) -> None:
        self.schedule = schedule
        self.psi_threshold = psi_threshold
        self.neighbour_share = neighbour_share
        self.teacher = teacher
        self.pool, self.psi_max = pool, psi_max
        self.needs_teacher = teacher == "base"

    def divergence_hint(self) -> str:
        return f", a smaller psi_max (now {self.psi_max:g})"

    def log_stats(self, info) -> str:
        return (f"psi {info.psi_mean:.3f} active {100 * info.psi_active:.0f}% "
                f"PoG share {100 * info.pog_share:.2f}%")

    def diagnose(self, history: Sequence) -> str | None:
        return pogdiff_inactive_warning([h.pog_share for h in history], [h.psi_mean for h in history],
                                        pool=self.pool)

    def terms(self, model, batch, x_t, g):
        table = model.table
        if table is None:
            raise ValueError("method 'pogdiff' needs a neighbour table: prepare the data with need_table=True")
        t, eps = batch.t_dev, batch.eps_dev
        eps_pred = model.predict(x_t, t, batch.rows, batch.drop)
        rows = batch.rows.numpy()
        slots = table.draw_slots(rows, g)
        nb = table.indices[rows, slots]
        psi = torch.as_tensor(table.psi[rows, slots], dtype=torch.float32)
        if self.schedule == "gaussian":
            if table.delta2 is None:
                raise ValueError("psi schedule 'gaussian' needs the pairs' image differences: build the neighbour "
                                 "table with clean=<the clean images> (pogdiff.method.prepare does)")
            delta2 = torch.as_tensor(table.delta2[rows, slots], dtype=torch.float32)
            psi = psi * gaussian_psi_factor(batch.t, delta2, model.betas)
        psi[batch.drop] = 0.0  # an unconditional row has no caption to borrow through
        shift = None
        if self.neighbour_share < 1.0:
            pair_delta2 = None if table.delta2 is None else torch.as_tensor(table.delta2[rows, slots])
            shift = expected_shift(psi, batch.t, pair_delta2, model.betas)
        active = neighbour_pass_rows(psi, shift, threshold=self.psi_threshold, share=self.neighbour_share)
        psi = torch.where(active, psi, torch.zeros_like(psi))
        eps_nb = torch.zeros_like(eps_pred)
        if bool(active.any()):
            idx = torch.nonzero(active).flatten().to(eps_pred.device)
            predict = model.predict if self.teacher == "live" else model.predict_teacher
            if predict is None:
                raise ValueError("psi teacher 'base' needs the frozen base weights: the trainer is given them "
                                 "by pogdiff.training.run.train (teacher_unet=...)")
            with torch.no_grad():
                eps_nb[idx] = predict(x_t[idx], t[idx], torch.as_tensor(nb)[active], None).to(eps_nb.dtype)
        terms = losses.pogdiff_loss(eps_pred, eps, eps_nb, psi.to(eps_pred.device))
        return terms, {"psi_mean": float(psi.mean()), "psi_active": float(active.float().mean())}


class T2H(Objective):
    """Head-to-tail target transfer (T2H, "Long-tailed Diffusion Models with Oriented Calibration",
    ICLR 2024), on the same batches as the other methods (README "The method").

    For each row ``i`` a source row ``j`` of the batch is drawn with probability proportional to
    ``exp(losses.t2h_log_weights)[i, j]`` (``j = i`` included). It is accepted when it is another data
    row, its class has at least as many training rows as ``i``'s (knowledge flows from head to
    tail) and ``i``'s caption was not dropped; an accepted row trains on :func:`losses.transferred_target`, still
    conditioned on its own caption; a refused one keeps its own noise as the target.
    """

    name = "t2h"

    def log_stats(self, info) -> str:
        return f"transferred {100 * info.transfer_rate:.0f}%"

    def terms(self, model, batch, x_t, g):
        if model.class_count is None:
            raise ValueError("method 't2h' needs each row's class size: the trainer passes class_count")
        t, eps, rows, drop = batch.t_dev, batch.eps_dev, batch.rows, batch.drop
        x0 = batch.x0_dev
        abar = torch.cumprod(1.0 - model.betas.double(), 0)[batch.t]  # [B]
        weights = torch.softmax(losses.t2h_log_weights(x0, eps, abar.to(x0.device)), dim=1).cpu()
        source = torch.multinomial(weights, 1, generator=g).squeeze(1)  # [B] a batch index per row
        count = model.class_count[rows]
        accept = (rows[source] != rows) & (count[source] >= count) & ~drop  # a copy of the row moves nothing
        moved = losses.transferred_target(x_t, x0[source.to(x0.device)], abar.to(x_t.device))
        target = torch.where(losses.bcast(accept.to(eps.device), eps), moved, eps.float())  # refused: eps itself
        eps_pred = model.predict(x_t, t, rows, drop)
        terms = losses.mse_loss(eps_pred, target)
        return terms, {"transfer_rate": float(accept.float().mean())}


def objective_for(cfg) -> Objective:
    """The objective of a :class:`pogdiff.config.TrainConfig`."""
    if cfg.method == "pogdiff":
        return PoGDiff(cfg.psi.schedule, cfg.psi.psi_threshold, cfg.psi.teacher, pool=cfg.psi.pool,
                       psi_max=cfg.psi.psi_max, neighbour_share=cfg.psi.neighbour_share)
    if cfg.method == "cbdm":
        return CBDM(cfg.cbdm_tau)
    if cfg.method == "t2h":
        return T2H()
    if cfg.method in ("baseline", "resample"):  # resample: plain loss on class-balanced batches
        return Objective()
    raise ValueError(f"unknown method {cfg.method!r}: use baseline, resample, cbdm, t2h or pogdiff")


# ---------------------------------------------------------------- is PoGDiff doing anything?
# PoGDiff counts as inactive when the PoG term stays below this share of the loss.
INACTIVE_POG_SHARE = 0.01
INACTIVE_MIN_STEPS = 10  # judged over at least this many steps
INACTIVE_WINDOW = 50  # steps judged during training (the latest ones)


def pog_share(terms: dict[str, float]) -> float:
    """The PoG term's share of the loss, ``pog / loss`` (0 without a PoG term)."""
    loss = terms.get("loss", 0.0)
    return float(terms.get("pog", 0.0) / loss) if loss > 0 else 0.0


def pogdiff_inactive_warning(pog_shares: Sequence[float], psi_means: Sequence[float], *,
                             pool: str | None = None, summary_path: str | Path = QUALITY_SUMMARY) -> str | None:
    """A plain-words warning when PoGDiff behaves like plain fine-tuning, else None.

    Judged on the mean PoG share of the loss over the given steps (at least
    ``INACTIVE_MIN_STEPS``): below ``INACTIVE_POG_SHARE`` the neighbour term changes the target
    too little to matter (README "Is PoGDiff doing anything?").

    :param pog_shares: per-step ``StepInfo.pog_share``.
    :param psi_means: per-step ``StepInfo.psi_mean``.
    :param pool: the run's neighbour pool; the advice does not suggest the pool already in use.
    :param summary_path: the quality benchmark's summary, whose measured figures the warning quotes
        (:func:`measured_pog_effect`).
    """
    if len(pog_shares) < INACTIVE_MIN_STEPS:
        return None
    share = float(np.mean(pog_shares))
    if share >= INACTIVE_POG_SHARE:
        return None
    psi = float(np.mean(psi_means))
    return (
        f"PoGDiff is doing almost nothing on this data: the PoG term is {100 * share:.2f}% of the loss "
        f"(mean psi {psi:.3f}). The captions' neighbours predict what the captions themselves predict, so "
        "PoGDiff behaves like plain fine-tuning. Try "
        + ("" if pool == "other_class" else "neighbours from other classes (psi pool 'other_class'), ")
        + "a larger psi_max, or check that rare classes have at least 2 images; see README "
        "\"Is PoGDiff doing anything?\". " + measured_pog_effect(summary_path)
    )


# What the quality benchmark compared: the PoG term against its ablation, and the ablation (tempered
# class-balanced batches, no PoG term) against plain fine-tuning; the rare ("few") subjects' accuracy.
POG_COMPARISON, TEMPERED_COMPARISON = "pogdiff_vs_pogdiff_no_pog", "pogdiff_no_pog_vs_baseline"
UNMEASURED_POG_EFFECT = ("On the embedded benchmark sets the PoG term changed rare-subject accuracy little: the "
                         "gain came from the tempered class-balanced batches (README \"Results\").")


def measured_pog_effect(summary_path: str | Path = QUALITY_SUMMARY) -> str:
    """What the quality benchmark measured of the PoG term on the rare subjects, in words, read from its
    ``summary.json`` (per set, ``comparisons`` -> :data:`POG_COMPARISON` and :data:`TEMPERED_COMPARISON`
    -> ``few``: ``ratio_of_means`` and ``hierarchical_ci95``, the interval over seeds and classes, else
    ``bootstrap_ci95``); :data:`UNMEASURED_POG_EFFECT`, without
    figures, when the file is missing or holds no such comparison."""
    try:
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
        parts = [f"{name}: {_accuracy_change(entry['comparisons'][POG_COMPARISON]['few'])} from the PoG term, "
                 f"{_accuracy_change(entry['comparisons'][TEMPERED_COMPARISON]['few'])} from the tempered batches "
                 "alone over plain fine-tuning" for name, entry in summary.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return UNMEASURED_POG_EFFECT
    if not parts:
        return UNMEASURED_POG_EFFECT
    return ("Measured on the embedded benchmark sets' rare subjects (results/quality/summary.json): "
            + "; ".join(parts) + " (README \"Results\").")


def _accuracy_change(comparison: dict) -> str:
    """``+3.5% accuracy`` for a ratio of class means of 1.035; "nothing measurable" when its 95%
    interval holds 1."""
    ratio, (low, high) = float(comparison["ratio_of_means"]), comparison.get("hierarchical_ci95") or comparison["bootstrap_ci95"]
    change = f"{100 * (ratio - 1):+.1f}% accuracy"
    return change if float(low) > 1 or float(high) < 1 else f"nothing measurable ({change}, its interval holds no change)"
