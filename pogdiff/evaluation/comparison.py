"""Comparing two runs in numbers (README "Results", "Reading B − A"): paired per-seed ratios, the
ratio of class means with a bootstrap interval over classes, and the verdicts of the Compare tab —
B − A per class and per bucket with an interval, a win only when the interval excludes 0.

All functions are pure: per-class values or per-class tables in, numbers, tables or a figure out.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pogdiff.config import DataConfig
from pogdiff.data.stats import SHOTS

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95


def paired_ratios(treated: Sequence[float], control: Sequence[float]) -> list[float]:
    """Per-seed ratios ``treated[s] / control[s]`` of a paired comparison (same seeds, data order
    and sampling noise); ``inf`` where the control is 0 and the treated run is not, NaN for 0 / 0
    and where either value is missing (NaN)."""
    if len(treated) != len(control):
        raise ValueError(f"paired ratios need as many treated as control values, got {len(treated)} and {len(control)}")
    out = []
    for a, b in zip(treated, control):
        if not (np.isfinite(a) and np.isfinite(b)):
            out.append(math.nan)
        elif b == 0:
            out.append(math.nan if a == 0 else math.inf)
        else:
            out.append(float(a) / float(b))
    return out


def bootstrap_ratio_ci(
    treated: Sequence[float],
    control: Sequence[float],
    *,
    n_boot: int = BOOTSTRAP_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of class means and its percentile bootstrap interval over classes.

    ``treated[c]`` and ``control[c]`` are one class's metric under two methods (already averaged
    over seeds). Classes are resampled with replacement, both methods together (paired), and the
    ratio ``mean(treated) / mean(control)`` is recomputed for each resample.

    :return: ``(ratio, low, high)``; NaN where the control mean is 0 in the data (resamples whose
        control mean is 0 are dropped).
    """
    a = np.asarray(treated, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty per-class vectors, got shapes {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ratio = a.mean() / b.mean() if b.mean() > 0 else math.nan
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(n_boot, a.size))
    num, den = a[picks].mean(axis=1), b[picks].mean(axis=1)
    ok = den > 0
    if not ok.any():
        return float(ratio), math.nan, math.nan
    ratios = num[ok] / den[ok]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(ratio), float(low), float(high)


def hierarchical_ratio_ci(
    treated: np.ndarray,
    control: np.ndarray,
    *,
    n_boot: int = BOOTSTRAP_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of means and its percentile bootstrap interval over training seeds *and* classes.

    ``treated[s, c]`` and ``control[s, c]`` are class ``c``'s metric in the runs of training seed
    ``s`` under two methods (paired: same seeds, same classes). Each resample draws the seeds
    with replacement and, independently, the classes with replacement (the design is crossed:
    every seed scores every class), keeps that sub-matrix for both methods and recomputes
    ``mean(treated) / mean(control)``. With one seed it is :func:`bootstrap_ratio_ci` of the
    class vectors; with several it widens by the seed-to-seed spread, which a bootstrap over
    classes of seed-averaged values hides (README "Results").

    :return: ``(ratio, low, high)``; NaN where the control mean is 0 (resamples whose control
        mean is 0 are dropped).
    """
    a = np.asarray(treated, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"need two equal [seeds x classes] matrices, got shapes {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ratio = a.mean() / b.mean() if b.mean() > 0 else math.nan
    rng = np.random.default_rng(seed)
    n_seeds, n_classes = a.shape
    classes = rng.integers(0, n_classes, size=(n_boot, n_classes))  # [B, C], drawn first: one seed
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # [B, S]    gives bootstrap_ratio_ci's draws
    # mean over the resampled sub-matrix = mean over s of (mean over c of x[seeds[s], classes[c]])
    num = np.stack([a[seeds[k]][:, classes[k]].mean() for k in range(n_boot)])
    den = np.stack([b[seeds[k]][:, classes[k]].mean() for k in range(n_boot)])
    ok = den > 0
    if not ok.any():
        return float(ratio), math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(num[ok] / den[ok], [tail, 100 - tail])
    return float(ratio), float(low), float(high)


# ============================================================ verdicts: B − A with an interval
# Is run B's per-class share (accuracy: the share of a class's generations named right) above
# run A's by more than resampling noise? README "What you see" ("Reading B − A") quotes the rule:
# a difference is a win only when its interval excludes 0.
VERDICT_SAMPLES = 4000  # bootstrap resamples of a verdict
VERDICT_SMOOTHING = 0.5  # pseudo-images of each outcome added before resampling a class's share
B_BETTER, A_BETTER, NO_DIFFERENCE, NOT_MEASURED = "B better", "A better", "no measurable difference", "—"


def _seed_class_matrix(tables: Sequence[pd.DataFrame] | pd.DataFrame, subjects: Sequence[str], metric: str,
                       side: str) -> tuple[np.ndarray, np.ndarray]:
    """``(share [S, C], n [S, C])`` of ``metric`` for ``subjects`` from one per-class table per seed."""
    tables = [tables] if isinstance(tables, pd.DataFrame) else list(tables)
    if not tables:
        raise ValueError(f"run {side} has no per-class table")
    share = np.full((len(tables), len(subjects)), np.nan)
    n = np.zeros((len(tables), len(subjects)))
    for s, table in enumerate(tables):
        missing = [c for c in ("subject", metric, "n_gen") if c not in table.columns]
        if missing:
            raise ValueError(f"per-class table {s} of run {side} lacks column(s) {missing}; a verdict needs "
                             f"'{metric}' and the images behind it ('n_gen'), as per_class_table writes them")
        rows = table.set_index("subject")
        for c, subject in enumerate(subjects):
            if subject in rows.index and np.isfinite(rows.at[subject, metric]) and rows.at[subject, "n_gen"] > 0:
                share[s, c], n[s, c] = float(rows.at[subject, metric]), float(rows.at[subject, "n_gen"])
    return share, n


def bootstrap_share_difference(
    share_a: np.ndarray,
    n_a: np.ndarray,
    share_b: np.ndarray,
    n_b: np.ndarray,
    *,
    n_boot: int = VERDICT_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    smoothing: float = VERDICT_SMOOTHING,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Class-averaged ``B − A`` of a share metric and its percentile bootstrap interval.

    ``share_x [S, C]`` (or ``[C]``) is run X's share of class ``c`` (e.g. accuracy) in seed ``s``,
    measured on ``n_x [S, C]`` images. The statistic is the mean over classes of
    ``mean_s share_b - mean_s share_a``. Each resample

    - draws the seeds with replacement (paired: seed ``s`` of A goes with seed ``s`` of B, the same
      training seed) when there are several,
    - then resamples each (seed, class)'s images with replacement, which for a share is a
      ``Binomial(n, p) / n`` draw, with ``p = (share * n + smoothing) / (n + 2 * smoothing)``:
      ``smoothing`` pseudo-images of each outcome, so a class where every image agrees still
      varies (with ``smoothing=0``, the plain bootstrap over images, 1 of 1 against 0 of 1 would
      look certain).

    :return: ``(difference, low, high)`` at ``level`` (percentiles of the resampled statistic);
        NaNs when no class has images on both sides. Classes measured on one side only are left out.
    """
    arrays = [np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (share_a, n_a, share_b, n_b)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"shares and image counts of A and B need one shape [seeds, classes], got "
                         f"{[a.shape for a in arrays]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if smoothing < 0 or n_boot < 1:
        raise ValueError(f"need smoothing >= 0 and n_boot >= 1, got {smoothing} and {n_boot}")
    pa, na, pb, nb = arrays
    measured = (na > 0) & (nb > 0) & np.isfinite(pa) & np.isfinite(pb)
    keep = measured.all(axis=0)  # a class counts when every seed measured it on both sides
    if not keep.any():
        return math.nan, math.nan, math.nan
    pa, na, pb, nb = (x[:, keep] for x in (pa, na, pb, nb))
    diff = float((pb.mean(axis=0) - pa.mean(axis=0)).mean())
    rng = np.random.default_rng(seed)
    n_seeds = pa.shape[0]
    pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), dtype=int)

    def resampled(p: np.ndarray, n: np.ndarray) -> np.ndarray:  # [n_boot, S, C]
        p_s, n_s = p[pick], n[pick]
        prob = np.clip((p_s * n_s + smoothing) / (n_s + 2 * smoothing), 0.0, 1.0)
        return rng.binomial(n_s.astype(np.int64), prob) / n_s

    stat = (resampled(pb, nb).mean(axis=1) - resampled(pa, na).mean(axis=1)).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stat, [tail, 100 - tail])
    return diff, float(low), float(high)


def difference_verdict(low: float, high: float) -> str:
    """``B better`` when the interval of ``B − A`` lies above 0, ``A better`` below 0,
    ``no measurable difference`` when it contains 0, ``—`` when there is no interval (NaN)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return NOT_MEASURED
    if low > 0:
        return B_BETTER
    if high < 0:
        return A_BETTER
    return NO_DIFFERENCE


def per_class_verdicts(
    tables_a: Sequence[pd.DataFrame] | pd.DataFrame,
    tables_b: Sequence[pd.DataFrame] | pd.DataFrame,
    *,
    metric: str = "accuracy",
    n_boot: int = VERDICT_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> pd.DataFrame:
    """Per class: A, B, ``B − A`` of ``metric``, its interval and the verdict.

    ``tables_x`` is run X's :func:`per_class_table` (one, or one per training seed, the seeds in
    the same order for A and B); the interval is :func:`bootstrap_share_difference` of that class.

    :return: columns ``subject, train_count, shot, a, b, diff, low, high, verdict``, one row per
        class of either run, rarest first (then by name).
    """
    first = [tables_a] if isinstance(tables_a, pd.DataFrame) else list(tables_a)
    second = [tables_b] if isinstance(tables_b, pd.DataFrame) else list(tables_b)
    if len(first) != len(second):
        raise ValueError(f"A has {len(first)} seed table(s) and B {len(second)}; pair them seed by seed")
    keys = pd.concat([t[["subject", "train_count", "shot"]] for t in first + second]).drop_duplicates("subject")
    keys = keys.sort_values(["train_count", "subject"], kind="stable").reset_index(drop=True)
    subjects = keys["subject"].tolist()
    pa, na = _seed_class_matrix(first, subjects, metric, "A")
    pb, nb = _seed_class_matrix(second, subjects, metric, "B")
    rows = []
    for c in range(len(subjects)):
        one = slice(c, c + 1)  # keep the [seeds, 1] shape
        diff, low, high = bootstrap_share_difference(pa[:, one], na[:, one], pb[:, one], nb[:, one], n_boot=n_boot,
                                                     level=level, seed=seed + c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class one side never drew: NaN
            a, b = float(np.nanmean(pa[:, c])), float(np.nanmean(pb[:, c]))
        rows.append({"a": a, "b": b, "diff": diff, "low": low, "high": high,
                     "verdict": difference_verdict(low, high)})
    return pd.concat([keys, pd.DataFrame(rows, index=keys.index)], axis=1)


def bucket_verdicts(
    tables_a: Sequence[pd.DataFrame] | pd.DataFrame,
    tables_b: Sequence[pd.DataFrame] | pd.DataFrame,
    *,
    metric: str = "accuracy",
    groups: dict[str, Sequence[str]] | None = None,
    n_boot: int = VERDICT_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> pd.DataFrame:
    """Per bucket (``all``, ``many``, ``medium``, ``few``, then any ``groups``: name -> classes):
    the class-averaged A, B and ``B − A`` of ``metric`` with its interval and verdict.

    Each class weighs the same (as in :func:`summarise`); the interval resamples the images of
    every class of the bucket (and the seeds, when there are several) in one go
    (:func:`bootstrap_share_difference`).

    :return: DataFrame indexed by ``bucket`` with ``n_classes, a, b, diff, low, high, verdict``.
    """
    first = [tables_a] if isinstance(tables_a, pd.DataFrame) else list(tables_a)
    second = [tables_b] if isinstance(tables_b, pd.DataFrame) else list(tables_b)
    if len(first) != len(second):
        raise ValueError(f"A has {len(first)} seed table(s) and B {len(second)}; pair them seed by seed")
    shots = pd.concat([t[["subject", "shot"]] for t in first + second]).drop_duplicates("subject")
    members = {"all": shots["subject"].tolist()}
    members.update({shot: shots.loc[shots["shot"] == shot, "subject"].tolist() for shot in SHOTS})
    members.update({name: [s for s in shots["subject"] if s in set(chosen)] for name, chosen in (groups or {}).items()})
    rows = []
    for i, (bucket, subjects) in enumerate(members.items()):
        pa, na = _seed_class_matrix(first, subjects, metric, "A")
        pb, nb = _seed_class_matrix(second, subjects, metric, "B")
        both = ((na > 0) & (nb > 0)).all(axis=0)
        diff, low, high = bootstrap_share_difference(pa, na, pb, nb, n_boot=n_boot, level=level, seed=seed + i) \
            if subjects else (math.nan,) * 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty bucket: NaN
            a = float(np.nanmean(pa[:, both].mean(axis=0))) if both.any() else math.nan
            b = float(np.nanmean(pb[:, both].mean(axis=0))) if both.any() else math.nan
        rows.append({"bucket": bucket, "n_classes": int(both.sum()), "a": a, "b": b, "diff": diff,
                     "low": low, "high": high, "verdict": difference_verdict(low, high)})
    return pd.DataFrame(rows).set_index("bucket")


VERDICT_COLOURS = {B_BETTER: "#16a34a", A_BETTER: "#dc2626", NO_DIFFERENCE: "#9ca3af", NOT_MEASURED: "#d1d5db"}


def count_ticks(low: float, high: float) -> list[int]:
    """Major ticks of a log axis of class sizes from ``low`` to ``high``: the numbers 1, 2, 5, 10,
    20, 50, ... inside the range (at least the two ends' neighbours), so the labels never crowd."""
    low, high = max(1.0, float(low)), max(1.0, float(high))
    ticks = [m * 10 ** e for e in range(0, 7) for m in (1, 2, 5)]
    inside = [t for t in ticks if low <= t <= high]
    if len(inside) < 2:
        below = [t for t in ticks if t < low][-1:] if low > 1 else []
        above = [t for t in ticks if t > high][:1]
        inside = below + inside + above
    return inside


def verdict_frequency_figure(
    verdicts: pd.DataFrame,
    names: tuple[str, str] = ("A", "B"),
    path: str | Path | None = None,
    *,
    config: DataConfig = DataConfig(),
    metric: str = "accuracy",
):
    """Two runs' per-class ``metric`` against training count, and ``B − A`` with its interval.

    Top: both runs (a marker per class, a line through the per-count means). Bottom: one bar per
    class at its training count (classes of the same count side by side), height ``B − A``, with
    its interval as an error bar; green only where B is measurably better (interval above 0), red
    where A is, grey where the interval contains 0 ("no measurable difference").

    :param verdicts: :func:`per_class_verdicts` (``subject, train_count, a, b, diff, low, high, verdict``).
    :return: a :class:`matplotlib.figure.Figure` with two axes (Agg canvas; no pyplot state). The
        title is the figure's (above both axes), the legends sit right of the axes, and the log
        axis is labelled at :func:`count_ticks` only, so no text overlaps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullFormatter

    missing = [c for c in ("subject", "train_count", "a", "b", "diff", "low", "high", "verdict")
               if c not in verdicts.columns]
    if missing:
        raise ValueError(f"verdicts lack column(s) {missing}; build them with per_class_verdicts")
    fig = Figure(figsize=(7.4, 5.4), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    table = verdicts.sort_values(["train_count", "subject"], kind="stable").reset_index(drop=True)
    counts = table["train_count"].to_numpy(float)
    for name, col, colour in zip(names, ("a", "b"), ("#6b7280", "#2563eb")):
        per_count = table.groupby("train_count")[col].mean()
        top.plot(per_count.index, per_count.values, color=colour, label=name, alpha=0.9)
        top.scatter(counts, table[col], color=colour, s=14)
    # classes of one count side by side: spread multiplicatively (the axis is logarithmic)
    rank = table.groupby("train_count").cumcount().to_numpy(float)
    size = table.groupby("train_count")["subject"].transform("size").to_numpy(float)
    x = counts * np.exp((rank - (size - 1) / 2) * 0.07)
    colours = [VERDICT_COLOURS.get(v, VERDICT_COLOURS[NOT_MEASURED]) for v in table["verdict"]]
    delta = table["diff"].to_numpy(float)
    bottom.bar(x, np.nan_to_num(delta), width=x * 0.06, color=colours)
    err = np.vstack([np.nan_to_num(delta - table["low"].to_numpy(float)),
                     np.nan_to_num(table["high"].to_numpy(float) - delta)])
    bottom.errorbar(x, np.nan_to_num(delta), yerr=np.maximum(err, 0), fmt="none", ecolor="#374151",
                    elinewidth=0.8, capsize=1.5)
    bottom.axhline(0.0, color="black", linewidth=0.8)
    for ax in (top, bottom):
        ax.axvline(config.few_shot_below - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.axvline(config.many_shot_above + 0.5, color="grey", linestyle=":", linewidth=1)
    bottom.set_xscale("log")
    if len(counts):
        lo, hi = float(x.min()), float(x.max())
        bottom.set_xlim(lo / 1.35, hi * 1.35)
        ticks = count_ticks(lo / 1.35, hi * 1.35)
        bottom.xaxis.set_major_locator(FixedLocator(ticks))
        bottom.set_xticklabels([str(t) for t in ticks])
    bottom.xaxis.set_minor_formatter(NullFormatter())
    top.xaxis.set_minor_formatter(NullFormatter())
    bottom.set_xlabel("training images of the class (log scale)")
    top.set_ylabel(metric)
    bottom.set_ylabel("B − A (95% interval)")
    if metric in ("accuracy", "gRecall") or metric.startswith("attr_"):
        top.set_ylim(-0.03, 1.03)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    shown = [v for v in (B_BETTER, A_BETTER, NO_DIFFERENCE) if v in set(table["verdict"])] or [NO_DIFFERENCE]
    bottom.legend(handles=[Patch(color=VERDICT_COLOURS[v], label=v) for v in shown], loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.suptitle(f"{metric} vs class frequency: {names[0]} (A) and {names[1]} (B)", fontsize="medium")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
