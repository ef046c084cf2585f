"""Evaluation metrics on image features: per class, then per many / medium / few-shot bucket.

All functions are pure: they take feature arrays (``float [N, F]``, one row per image) and
subject names, and return numbers or tables. Where features come from is the caller's concern
(:mod:`pogdiff.evaluation.demo_classifier`: the demo set's identity classifier, or a generic feature space for
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
# (pogdiff.evaluation.protocol.copy_and_coverage); summarise averages them like the others.
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
