"""Evaluation metrics on image features: per class, then per many / medium / few-shot bucket.

All functions are pure: they take feature arrays (``float [N, F]``, one row per image) and
subject names, and return numbers or tables. Where features come from is the caller's concern
(:mod:`pogdiff.evaluator`: the demo set's identity classifier, or a generic feature space for
user data).

Definitions (quoted by the README):

- **accuracy** of a class: the share of its generations that the frozen classifier assigns to the
  prompted subject.
- **gRecall** of a class (Kynkaenniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", recall, computed per class): the share of the class's *real*
  images whose feature lies inside the k-NN manifold of the class's *correctly identified*
  generations; the manifold is the union of closed balls centred on each generated feature with
  radius equal to that feature's Euclidean distance to its k-th nearest other generated feature.
- **FD**: the Frechet distance between Gaussians fitted to two feature sets (FID's formula, in
  whatever feature space the features come from).
- **dino**: the mean cosine similarity over all (generated, real) pairs of the class, a
  DINO-style subject-fidelity score.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.linalg

from pogdiff.config import DataConfig
from pogdiff.data.stats import SHOTS, shot_bucket

logger = logging.getLogger(__name__)

BUCKETS = ("all",) + SHOTS
# Metric columns of per_class_table, in this order; attr_<name>_acc columns follow.
METRIC_COLUMNS = ("accuracy", "gRecall", "dino")
# Largest imaginary part of sqrtm(S1 S2) that is treated as numerical noise without a warning.
_SQRTM_IMAG_TOL = 1e-3


def _as_feats(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, F] array, got shape {arr.shape}")
    return arr


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} entries but {name_b} has {len(b)}")


def identity_accuracy(pred_subjects: Sequence[str], target_subjects: Sequence[str]) -> float:
    """Share of positions where the predicted subject equals the target subject.

    :param pred_subjects: ``[N]`` predicted subject names.
    :param target_subjects: ``[N]`` prompted / true subject names.
    :return: ``mean(pred == target)`` in [0, 1]; NaN when ``N == 0``.
    """
    _check_same_length(pred_subjects, target_subjects, "pred_subjects", "target_subjects")
    if len(pred_subjects) == 0:
        return math.nan
    pred = np.asarray(pred_subjects, dtype=object)
    target = np.asarray(target_subjects, dtype=object)
    return float(np.mean(pred == target))


def per_class_accuracy(pred: Sequence[str], target: Sequence[str]) -> dict[str, float]:
    """Accuracy per target class: for each class c, ``mean(pred[i] == c over i with target[i] == c)``.

    :param pred: ``[N]`` predicted labels.
    :param target: ``[N]`` true labels.
    :return: ``{class: accuracy}`` for every class present in ``target``, in first-seen order.
    """
    _check_same_length(pred, target, "pred", "target")
    pred_arr = np.asarray(pred, dtype=object)
    target_arr = np.asarray(target, dtype=object)
    out: dict[str, float] = {}
    for c in dict.fromkeys(target):
        mask = target_arr == c
        out[c] = float(np.mean(pred_arr[mask] == c))
    return out


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]`` (clamped at 0 before the square root)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest *other* point (Euclidean).

    :param feats: ``[N, F]`` features, ``N > k``.
    :param k: neighbour rank, ``1 <= k < N``; the point itself is never its own neighbour.
    :return: ``[N]`` radii.
    """
    x = _as_feats(feats, "feats")
    n = len(x)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n <= k:
        raise ValueError(f"knn_radii needs more than k={k} points, got {n}")
    d = _pairwise_distances(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def g_recall(real_feats: np.ndarray, gen_feats: np.ndarray, *, k: int = 3) -> float:
    """Generative recall (Kynkaenniemi et al. 2019), used per class.

    The k-NN manifold of the generated set G is the union of closed Euclidean balls
    ``B(g, r_k(g))`` over ``g in G``, where ``r_k(g)`` is the distance from ``g`` to its k-th
    nearest other point of G (:func:`knn_radii`). Recall is the share of real samples ``x`` with
    ``min_g (||x - g|| - r_k(g)) <= 0``, i.e. that lie inside at least one ball:
    how much of the real distribution the generations cover.

    In the benchmark G is the class's correctly identified generations and the reals are the
    class's real images.

    :param real_feats: ``[N_real, F]`` real features (``N_real >= 1``).
    :param gen_feats: ``[N_gen, F]`` generated features.
    :param k: neighbour rank of the radii.
    :return: recall in [0, 1]; 0.0 when ``N_gen < k + 1`` (too few generations to form a
        manifold: a class with that few correct generations has covered nothing).
    """
    real = _as_feats(real_feats, "real_feats")
    gen = _as_feats(gen_feats, "gen_feats")
    if len(real) == 0:
        raise ValueError("g_recall needs at least one real sample")
    if len(gen) < k + 1:
        return 0.0
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]} vs generated {gen.shape[1]}")
    radii = knn_radii(gen, k)  # [N_gen]
    inside = (_pairwise_distances(real, gen) <= radii[None, :]).any(axis=1)  # [N_real]
    return float(inside.mean())


def _sqrtm(m: np.ndarray) -> tuple[np.ndarray, bool]:
    """:func:`scipy.linalg.sqrtm` of ``m`` and whether scipy flagged ``m`` as singular."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(m)
    return root, any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, *, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    ``FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with ``mu`` the sample mean and
    ``S`` the unbiased sample covariance (``ddof=1``) of each set. The matrix square root is
    :func:`scipy.linalg.sqrtm`; if the product is singular (scipy warns) or the root is not
    finite, it is recomputed with ``eps * I`` added to both covariances (fewer samples than
    feature dimensions make the covariances singular). A complex result from round-off is replaced by its
    real part (with a warning if the imaginary part exceeds 1e-3). The result is clamped at 0.

    :param feats_a: ``[N_a, F]`` features, ``N_a >= 2``.
    :param feats_b: ``[N_b, F]`` features, ``N_b >= 2``.
    """
    a = _as_feats(feats_a, "feats_a")
    b = _as_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean, singular = _sqrtm(cov_a @ cov_b)
    if singular or not np.isfinite(covmean).all():
        logger.debug("frechet_distance: singular covariance product; adding %g to the diagonals", eps)
        offset = eps * np.eye(len(cov_a))
        covmean, _ = _sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.abs(covmean.imag).max())
        if max_imag > _SQRTM_IMAG_TOL:
            logger.warning("frechet_distance: discarding imaginary part up to %.3g of sqrtm", max_imag)
        covmean = covmean.real
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))


def dino_score(gen_feats: np.ndarray, real_feats: np.ndarray) -> float:
    """Mean cosine similarity over every (generated, real) pair.

    ``mean_{i,j} <g_i / ||g_i||, x_j / ||x_j||>`` for ``g`` in ``gen_feats [N_gen, F]`` and
    ``x`` in ``real_feats [N_real, F]``; in [-1, 1]. NaN if either set is empty.
    """
    gen = _as_feats(gen_feats, "gen_feats")
    real = _as_feats(real_feats, "real_feats")
    if len(gen) == 0 or len(real) == 0:
        return math.nan
    gen = gen / np.maximum(np.linalg.norm(gen, axis=1, keepdims=True), 1e-12)
    real = real / np.maximum(np.linalg.norm(real, axis=1, keepdims=True), 1e-12)
    # mean of G R^T == (mean of G) . (mean of R): no [N_gen, N_real] matrix needed.
    return float(gen.mean(0) @ real.mean(0))


def per_class_table(
    *,
    subjects_gen: Sequence[str],
    pred_gen: Sequence[str],
    gen_feats: np.ndarray,
    real_subjects: Sequence[str],
    real_feats: np.ndarray,
    train_counts: dict[str, int],
    config: DataConfig = DataConfig(),
    attr_pred: dict[str, np.ndarray] | None = None,
    attr_target: dict[str, np.ndarray] | None = None,
    k: int = 3,
) -> pd.DataFrame:
    """One row per prompted class with its metrics.

    :param subjects_gen: ``[N_gen]`` the subject each generation was prompted with.
    :param pred_gen: ``[N_gen]`` the classifier's subject for each generation.
    :param gen_feats: ``[N_gen, F]`` features of the generations.
    :param real_subjects: ``[N_real]`` subject of each real (reference) image.
    :param real_feats: ``[N_real, F]`` features of the real images.
    :param train_counts: training images per subject; every prompted subject must be present.
    :param config: shot thresholds (:func:`pogdiff.data.stats.shot_bucket`: many > 20, few < 5 by default).
    :param attr_pred: optional ``{attribute: int [N_gen]}`` predicted attribute of each generation.
    :param attr_target: ``{attribute: int [N_gen]}`` the attribute each generation was prompted
        with; needed for every attribute in ``attr_pred``.
    :param k: neighbour rank of :func:`g_recall`.
    :return: DataFrame with columns ``subject, train_count, shot, accuracy, gRecall, dino,
        attr_<name>_acc..., n_gen``, one row per subject of ``subjects_gen``, ordered by
        ``train_count`` descending then name. ``accuracy`` is :func:`identity_accuracy` over the
        class's generations; ``gRecall`` is :func:`g_recall` of the class's reals against its
        correctly identified generations (0 when fewer than ``k + 1`` are correct; NaN when the
        class has no real images); ``dino`` is :func:`dino_score` of all the class's generations
        against its reals; ``attr_<name>_acc`` is the share of the class's generations whose
        predicted attribute equals the prompted one.
    """
    gen = _as_feats(gen_feats, "gen_feats")
    real = _as_feats(real_feats, "real_feats")
    _check_same_length(subjects_gen, pred_gen, "subjects_gen", "pred_gen")
    _check_same_length(subjects_gen, gen, "subjects_gen", "gen_feats")
    _check_same_length(real_subjects, real, "real_subjects", "real_feats")
    attr_pred = attr_pred or {}
    attr_target = attr_target or {}
    missing_attr = sorted(set(attr_pred) - set(attr_target))
    if missing_attr:
        raise ValueError(f"attr_target lacks attribute(s) {missing_attr} given in attr_pred")
    for name in attr_pred:
        _check_same_length(subjects_gen, attr_pred[name], "subjects_gen", f"attr_pred[{name!r}]")
        _check_same_length(subjects_gen, attr_target[name], "subjects_gen", f"attr_target[{name!r}]")
    unknown = sorted(set(subjects_gen) - set(train_counts))
    if unknown:
        raise ValueError(f"subjects without a train count: {unknown[:5]} (train_counts has {len(train_counts)})")

    subj_gen = np.asarray(subjects_gen, dtype=object)
    pred = np.asarray(pred_gen, dtype=object)
    subj_real = np.asarray(real_subjects, dtype=object)
    classes = sorted(set(subjects_gen), key=lambda s: (-train_counts[s], s))
    rows = []
    for c in classes:
        g_mask = subj_gen == c
        correct = g_mask & (pred == c)
        r_mask = subj_real == c
        row = {
            "subject": c,
            "train_count": int(train_counts[c]),
            "shot": shot_bucket(int(train_counts[c]), config),
            "accuracy": float(np.mean(pred[g_mask] == c)),
            "gRecall": g_recall(real[r_mask], gen[correct], k=k) if r_mask.any() else math.nan,
            "dino": dino_score(gen[g_mask], real[r_mask]),
        }
        for name in attr_pred:
            hits = np.asarray(attr_pred[name])[g_mask] == np.asarray(attr_target[name])[g_mask]
            row[f"attr_{name}_acc"] = float(hits.mean())
        row["n_gen"] = int(g_mask.sum())
        rows.append(row)
    columns = ["subject", "train_count", "shot", *METRIC_COLUMNS]
    columns += [f"attr_{name}_acc" for name in attr_pred] + ["n_gen"]
    return pd.DataFrame(rows, columns=columns)


# Per-class columns added after per_class_table when the training images are known
# (pogdiff.evaluation.copy_and_coverage); summarise averages them like the others.
EXTRA_COLUMNS = ("copy", "proximity", "coverage")


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The columns of a :func:`per_class_table` that are averaged by :func:`summarise`."""
    attr = [c for c in table.columns if c.startswith("attr_") and c.endswith("_acc")]
    return [c for c in METRIC_COLUMNS + EXTRA_COLUMNS if c in table.columns] + attr


def summarise(
    table: pd.DataFrame,
    *,
    gen_feats_all: np.ndarray | None = None,
    real_feats_all: np.ndarray | None = None,
    gen_subjects_all: Sequence[str] | None = None,
    real_subjects_all: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Average a :func:`per_class_table` over all / many / medium / few-shot classes.

    Each metric column is the *class-averaged* mean (every class weighs the same, NaNs skipped)
    over the classes of the bucket. ``n_classes`` counts the bucket's classes and ``n_gen`` sums
    their generations; a bucket without classes has NaN metrics.

    ``FD`` is :func:`frechet_distance` between generated and real features. With only
    ``gen_feats_all [N_gen, F]`` and ``real_feats_all [N_real, F]`` it is computed once, over
    all generations vs all reals, in the ``"all"`` row (NaN elsewhere). When
    ``gen_subjects_all [N_gen]`` and ``real_subjects_all [N_real]`` are also given, each bucket
    row gets the FD between the generations and reals of that bucket's classes (``"all"``: the
    table's classes); a side with fewer than 2 samples gives NaN. Without features, FD is NaN.

    :return: DataFrame indexed by ``bucket`` (``all, many, medium, few``) with columns
        ``n_classes, <metric columns>, n_gen, FD``.
    """
    metrics = metric_columns(table)
    per_subject = dict(zip(table["subject"], table["shot"]))
    have_feats = gen_feats_all is not None and real_feats_all is not None
    per_bucket_fd = have_feats and gen_subjects_all is not None and real_subjects_all is not None
    if have_feats and not per_bucket_fd and (gen_subjects_all is not None or real_subjects_all is not None):
        raise ValueError("per-bucket FD needs both gen_subjects_all and real_subjects_all")
    if per_bucket_fd:
        gen_all = _as_feats(gen_feats_all, "gen_feats_all")
        real_all = _as_feats(real_feats_all, "real_feats_all")
        _check_same_length(gen_subjects_all, gen_all, "gen_subjects_all", "gen_feats_all")
        _check_same_length(real_subjects_all, real_all, "real_subjects_all", "real_feats_all")
        gen_shot = np.asarray([per_subject.get(s, "") for s in gen_subjects_all], dtype=object)
        real_shot = np.asarray([per_subject.get(s, "") for s in real_subjects_all], dtype=object)

    rows = []
    for bucket in BUCKETS:
        part = table if bucket == "all" else table[table["shot"] == bucket]
        row: dict[str, float] = {"bucket": bucket, "n_classes": len(part)}
        for col in metrics:
            row[col] = float(part[col].mean()) if len(part) else math.nan
        row["n_gen"] = int(part["n_gen"].sum())
        fd = math.nan
        if per_bucket_fd:
            keep = set(SHOTS) if bucket == "all" else {bucket}
            g = gen_all[np.isin(gen_shot, list(keep))]
            r = real_all[np.isin(real_shot, list(keep))]
            if len(g) >= 2 and len(r) >= 2:
                fd = frechet_distance(g, r)
        elif have_feats and bucket == "all":
            fd = frechet_distance(gen_feats_all, real_feats_all)
        row["FD"] = fd
        rows.append(row)
    return pd.DataFrame(rows).set_index("bucket")


def accuracy_vs_frequency_figure(
    tables: dict[str, pd.DataFrame],
    path: str | Path | None = None,
    *,
    config: DataConfig = DataConfig(),
    metric: str = "accuracy",
):
    """Per-class ``metric`` against training count, one series per method.

    :param tables: ``{method name: per_class_table}``.
    :param path: if given, the figure is also saved there (format from the suffix).
    :param config: shot thresholds, drawn as dotted vertical lines.
    :param metric: the column plotted on the y axis (default ``accuracy``).
    :return: a :class:`matplotlib.figure.Figure` (Agg canvas; no pyplot state is touched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, table in tables.items():
        if metric not in table.columns:
            raise ValueError(f"table for {method!r} has no column {metric!r}; columns: {list(table.columns)}")
        points = table.sort_values("train_count")
        # One line through the per-count means; every class as a marker.
        means = points.groupby("train_count")[metric].mean()
        line = ax.plot(means.index, means.values, label=method, alpha=0.8)[0]
        ax.scatter(points["train_count"], points[metric], color=line.get_color(), s=14)
    ax.axvline(config.few_shot_below - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.axvline(config.many_shot_above + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel(metric)
    if metric in ("accuracy", "gRecall") or metric.startswith("attr_"):
        ax.set_ylim(-0.03, 1.03)
    if tables:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title(f"{metric} vs class frequency")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def paired_frequency_figure(
    table_a: pd.DataFrame,
    table_b: pd.DataFrame,
    names: tuple[str, str] = ("A", "B"),
    path: str | Path | None = None,
    *,
    config: DataConfig = DataConfig(),
    metric: str = "accuracy",
):
    """Two runs' per-class ``metric`` against training count, with their difference highlighted.

    Top: both runs (markers per class, a line through the per-count means) and the area between
    the two mean lines, green where B is above A and red where it is below. Bottom: one bar per
    class at its training count, height ``B - A`` (same colours). Classes present in only one table
    are left out of the bars.

    :param table_a: per-class table of run A (``subject``, ``train_count``, ``metric``).
    :param table_b: the same for run B.
    :param names: legend names of A and B.
    :return: a :class:`matplotlib.figure.Figure` with two axes (Agg canvas; no pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for name, table in zip(names, (table_a, table_b)):
        missing = [c for c in ("subject", "train_count", metric) if c not in table.columns]
        if missing:
            raise ValueError(f"table for {name!r} lacks column(s) {missing}; columns: {list(table.columns)}")
    fig = Figure(figsize=(6.0, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    means = []
    for name, table, colour in zip(names, (table_a, table_b), ("#6b7280", "#2563eb")):
        per_count = table.groupby("train_count")[metric].mean()
        means.append(per_count)
        top.plot(per_count.index, per_count.values, color=colour, label=name, alpha=0.9)
        top.scatter(table["train_count"], table[metric], color=colour, s=14)
    joined = pd.concat(means, axis=1, keys=["a", "b"]).dropna().sort_index()
    x, ya, yb = joined.index.to_numpy(float), joined["a"].to_numpy(float), joined["b"].to_numpy(float)
    top.fill_between(x, ya, yb, where=yb >= ya, color="#16a34a", alpha=0.25, interpolate=True, label="B above A")
    top.fill_between(x, ya, yb, where=yb < ya, color="#dc2626", alpha=0.25, interpolate=True, label="B below A")
    paired = table_a[["subject", "train_count", metric]].merge(
        table_b[["subject", metric]], on="subject", suffixes=("_a", "_b")).sort_values("train_count")
    delta = (paired[f"{metric}_b"] - paired[f"{metric}_a"]).to_numpy(float)
    counts = paired["train_count"].to_numpy(float)
    bottom.bar(counts, delta, width=counts * 0.12, color=np.where(delta >= 0, "#16a34a", "#dc2626"))
    bottom.axhline(0.0, color="black", linewidth=0.8)
    for ax in (top, bottom):
        ax.axvline(config.few_shot_below - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.axvline(config.many_shot_above + 0.5, color="grey", linestyle=":", linewidth=1)
    bottom.set_xscale("log")
    bottom.set_xlabel("training images of the class (log scale)")
    top.set_ylabel(metric)
    bottom.set_ylabel(f"{metric}: B − A")
    if metric in ("accuracy", "gRecall") or metric.startswith("attr_"):
        top.set_ylim(-0.03, 1.03)
    top.legend(loc="lower right", fontsize="small")
    top.set_title(f"{metric} vs class frequency: {names[0]} and {names[1]}")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ---------------------------------------------------------------------------------- statistics
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
