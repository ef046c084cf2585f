"""Per-class draws and loss weights beside the method's own batches (README "Training options").

- ``balance="from-data"``: a class is drawn with probability proportional to its draw weight, then
  one of its rows uniformly. The weights are the set's own (README "Your own data", kohya_ss and
  OneTrainer sets): ``n_c * repeats`` for kohya folders, ``dataset_config.toml`` and OneTrainer
  ``REPEATS``, the ``balancing`` samples for OneTrainer ``SAMPLES``. Every image of class ``c`` is
  then drawn with probability ``r_c / sum_k n_k r_k``, the share kohya gives it in an epoch.
- ``class_loss_weights``: a multiplier of each named class's per-sample loss (OneTrainer's
  ``loss_weight``); classes not named keep 1.
- ``class_loss_beta``: ``w_c ∝ n_c ** -beta``, normalised so that the rows of a plain (uniform)
  batch weigh 1 on average: ``w_c = n_c ** -beta * N / sum_k n_k ** (1 - beta)``; 0 is off.

The two loss weights multiply each other and the per-timestep weights of
:func:`pogdiff.method.losses.eps_loss_weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pogdiff.config import TrainConfig, uses_balanced_sampling

FROM_DATA = "from-data"


def with_data_weights(cfg: TrainConfig, dataset) -> TrainConfig:
    """``cfg`` with the set's draw weights, and its loss weights unless ``cfg`` names some, when
    ``cfg.balance`` is ``"from-data"`` and ``cfg.class_draw_weights`` is empty; else ``cfg``.

    :param dataset: an ``ImageTextSet``; its ``class_weights`` come from a kohya / OneTrainer config.
    :raises ValueError: from-data on a set that says nothing about how often its classes are drawn.
    """
    if cfg.balance != FROM_DATA or cfg.class_draw_weights:
        return cfg
    present = set(dataset.subjects)
    weights = {c: e for c, e in (getattr(dataset, "class_weights", None) or {}).items() if c in present}
    if not weights:
        raise ValueError(
            "balance 'from-data' draws each class as the set's own repeats say, but this set has none: load "
            "kohya <repeats>_<name> folders, a dataset_config.toml or a OneTrainer concepts.json (README \"Your "
            "own data\"), give class_draw_weights, or use balance 'method'")
    loss = cfg.class_loss_weights or {c: float(e["loss_weight"]) for c, e in weights.items()
                                      if float(e["loss_weight"]) != 1.0}
    return dataclasses.replace(cfg, class_draw_weights={c: float(e["draw_weight"]) for c, e in weights.items()},
                               class_loss_weights=loss)


def class_names(class_rows: Sequence, subjects: Sequence[str]) -> list[str]:
    """The name of each class index (the subject of its first row)."""
    return [subjects[int(rows[0])] for rows in class_rows]


def _check_names(option: str, given: dict, names: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{option} names class(es) {', '.join(map(repr, unknown))} that the set does not have; "
                         f"its classes are {', '.join(map(repr, sorted(names)))}")


def draw_probabilities(cfg: TrainConfig, names: Sequence[str]) -> torch.Tensor | None:
    """float64 ``[C]``: the probability of drawing each class under ``balance="from-data"``
    (its draw weight over their sum); None for the method's own draw."""
    if cfg.balance != FROM_DATA:
        return None
    weights = cfg.class_draw_weights
    _check_names("class_draw_weights", weights, names)
    missing = [c for c in names if c not in weights]
    if missing:
        raise ValueError(f"balance 'from-data' has no draw weight for class(es) {', '.join(map(repr, missing))}: "
                         "give every class one in class_draw_weights (or leave it empty to take the set's repeats)")
    probs = torch.tensor([float(weights[c]) for c in names], dtype=torch.float64)
    return probs / probs.sum()


def beta_loss_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """float64 ``[C]``: ``n_c ** -beta * N / sum_k n_k ** (1 - beta)``, whose mean over the rows of
    a uniform draw (class ``c`` with probability ``n_c / N``) is 1."""
    n = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    return n ** -beta * n.sum() / (n ** (1.0 - beta)).sum()


def class_loss_table(cfg: TrainConfig, names: Sequence[str], counts: Sequence[int]) -> torch.Tensor | None:
    """float32 ``[C]``: each class's loss multiplier (``class_loss_weights`` times the
    ``class_loss_beta`` weight); None when every class weighs 1 (the loss is left untouched)."""
    if not cfg.class_loss_weights and not cfg.class_loss_beta:
        return None
    _check_names("class_loss_weights", cfg.class_loss_weights, names)
    table = torch.tensor([float(cfg.class_loss_weights.get(c, 1.0)) for c in names], dtype=torch.float64)
    if cfg.class_loss_beta:
        table = table * beta_loss_weights(counts, cfg.class_loss_beta)
    return table.float()


def run_class_shares(cfg: TrainConfig, names: Sequence[str], counts: Sequence[int]) -> dict[str, float]:
    """Each class's expected share of a run's batch rows: ``class_draw_weights`` normalised under
    ``balance="from-data"``, ``n_c ** alpha`` normalised for class-balanced batches
    (:func:`pogdiff.training.trainer.class_draw_weights`), ``n_c / N`` for plain ones."""
    probs = draw_probabilities(cfg, names)
    if probs is None:
        n = torch.tensor([float(c) for c in counts], dtype=torch.float64)
        alpha = cfg.balance_alpha if uses_balanced_sampling(cfg) else 1.0
        probs = n ** alpha / (n ** alpha).sum()
    return {c: float(p) for c, p in zip(names, probs)}


def kohya_repeats(shares: dict[str, float], counts: dict[str, int], *, tolerance: float = 0.05,
                  max_scale: int = 20) -> dict[str, int]:
    """Whole kohya ``num_repeats`` per class whose epoch shares ``n_c r_c / sum_k n_k r_k`` come
    closest to ``shares``: ``r_c ∝ share_c / n_c``, the smallest ``m`` (1, 2, ... ``max_scale``)
    for the least of them, rounded; the first ``m`` whose shares are all within ``tolerance``
    (relative) of the wanted ones, else the closest."""
    ratio = {c: shares[c] / counts[c] for c in shares if counts.get(c)}
    low = min(ratio.values())
    best, best_err = {}, float("inf")
    for m in range(1, max_scale + 1):
        reps = {c: max(1, round(m * r / low)) for c, r in ratio.items()}
        total = sum(counts[c] * r for c, r in reps.items())
        err = max(abs(counts[c] * r / total - shares[c]) / shares[c] for c, r in reps.items())
        if err < best_err:
            best, best_err = reps, err
        if err <= tolerance:
            break
    return best
