"""The evaluation protocol: generate for held-out captions with fixed seeds, score, summarise.

One protocol serves the Compare tab's metrics, the user-data judge's agreement check and the
quality benchmark (README "Results"):

- generations: every chosen held-out caption with ``sample_seeds`` sampling seeds each; the seed
  of caption ``i`` (of ``N``) in round ``s`` is ``i + s * N``, so round 0 is the seed the Compare
  tab has always used and every method sees the same noise;
- scores: the frozen evaluator's identity and attribute predictions and features, turned into the
  per-class table of :func:`pogdiff.evaluation.metrics.per_class_table` and its bucket summary;
- with the training images at hand, more per-class columns (README "Copying and diversity"):
  ``copy``, the share of generations that sit closer to one of their class's training images than
  held-out real images of that class do (:func:`copy_flags`); ``proximity``, the median of that
  distance ratio (:func:`proximity_ratios`: below 1 is closer than any fresh photograph); and
  ``coverage``, the share of the prompted attribute combinations the generations of that subject
  show (:func:`attribute_coverage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pogdiff.config import SampleConfig

# The sampler every metric of the Compare tab and the benchmarks uses.
EVAL_SAMPLE = SampleConfig(scheduler="ddim", steps=25, guidance_scale=3.0)
FAST_EVAL_PER_CLASS = 4  # held-out captions per class in the Compare tab's "fast" metrics
# Metric modes of the Compare tab (README "What you see"): "fast" takes the first
# FAST_EVAL_PER_CLASS held-out captions of every class, "full" every held-out caption.
METRIC_MODES = {"fast": FAST_EVAL_PER_CLASS, "full": None}
# A generation counts as a copy when its nearest training image of its class is closer than
# COPY_MARGIN times the distance at which the closest held-out real image of that class sits from
# the training images (README "Copying and diversity").
COPY_MARGIN = 0.5
ATTRIBUTES = ("smiling", "glasses", "age_group")


def subset(ds, rows: Sequence[int]):
    """The image-text set of ``rows`` of ``ds`` (same order)."""
    rows = list(rows)
    return dataclasses.replace(ds, samples=[ds.samples[i] for i in rows], images=ds.images[rows])


def per_class_rows(eval_set, n: int) -> list[int]:
    """The first ``n`` evaluation captions of every class, in file order."""
    seen: dict[str, int] = {}
    rows = []
    for i, s in enumerate(eval_set.subjects):
        if seen.get(s, 0) < n:
            seen[s] = seen.get(s, 0) + 1
            rows.append(i)
    return rows


def metric_eval_set(eval_set, mode: str):
    """The evaluation captions of a metric mode (see ``METRIC_MODES``)."""
    if mode not in METRIC_MODES:
        raise ValueError(f"unknown metric mode {mode!r}; choose one of {', '.join(METRIC_MODES)}")
    per_class = METRIC_MODES[mode]
    return eval_set if per_class is None else subset(eval_set, per_class_rows(eval_set, per_class))


def checkpoint_digest(checkpoint: str | Path) -> str:
    """sha256 of a checkpoint's weight files (names and bytes): the key of its cached metrics."""
    root = Path(checkpoint)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*.safetensors") if "trainer_state" not in p.name)
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) under {root}")
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def attr_targets(eval_set) -> dict[str, np.ndarray]:
    """The attributes each evaluation caption asks for (embedded sets): ``{name: int [N]}``."""
    from pogdiff.data.identities import age_group

    extra = [s.extra for s in eval_set.samples]
    return {
        "smiling": np.array([int(bool(e["smiling"])) for e in extra]),
        "glasses": np.array([int(bool(e["glasses"])) for e in extra]),
        "age_group": np.array([age_group(int(e["age"])) for e in extra]),
    }


def sampling_seeds(n_captions: int, sample_seeds: int) -> list[int]:
    """Seeds of ``n_captions`` captions repeated ``sample_seeds`` times: ``i + s * n_captions``."""
    if sample_seeds < 1:
        raise ValueError(f"sample_seeds must be >= 1, got {sample_seeds}")
    return [i + s * n_captions for s in range(sample_seeds) for i in range(n_captions)]


# ------------------------------------------------------------------ copying and diversity
def _flat(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {arr.shape}")
    return arr.reshape(len(arr), -1).astype(np.float64) / 255.0


def nearest_distance(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """RMS pixel distance (pixels in [0, 1]) of each image to its nearest reference: ``[N]``."""
    a, b = _flat(images), _flat(references)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"images and references differ in size: {images.shape[1:]} vs {references.shape[1:]}")
    if len(b) == 0:
        raise ValueError("nearest_distance needs at least one reference image")
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0).min(axis=1) / a.shape[1])


def proximity_ratios(generated: np.ndarray, train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """``d(g, T) / min_r d(r, T)`` for each generation of one class (see :func:`copy_flags`):
    below 1, a generation sits closer to a training image than any held-out photograph does."""
    if len(held_out) == 0:
        raise ValueError("copy_flags needs held-out real images of the class as the reference")
    reference = float(nearest_distance(held_out, train).min())
    return nearest_distance(generated, train) / max(reference, 1e-12)


def copy_flags(generated: np.ndarray, train: np.ndarray, held_out: np.ndarray, *,
               margin: float = COPY_MARGIN) -> np.ndarray:
    """Which generations of one class are copies of its training images: bool ``[N]``.

    A generation ``g`` is a copy when ``d(g, T) < margin * min_r d(r, T)``: ``T`` the class's
    training images, ``r`` its held-out real images, ``d`` the RMS pixel distance to the nearest
    image of ``T``. A fresh photograph of the subject is never that close to a training image, so
    held-out reals score about 0 and exact copies 1 (README "Copying and diversity").
    """
    return proximity_ratios(generated, train, held_out) < margin


def attribute_coverage(pred_subjects: Sequence[str], subject: str, prompted: dict[str, np.ndarray],
                       predicted: dict[str, np.ndarray]) -> float:
    """Share of the attribute combinations asked of one subject that its generations show.

    A combination (the values of every attribute in ``prompted``) is covered when at least one
    generation prompted with it is identified as ``subject`` *and* shows exactly those values.
    One memorised picture covers one combination; a model that renders the subject in the asked
    ages, expressions and glasses covers them all (the diversity side of the paper's gRecall claim).

    :param pred_subjects: ``[N]`` the classifier's subject for each of the class's generations.
    :param prompted: ``{attribute: int [N]}`` the values each generation was prompted with.
    :param predicted: ``{attribute: int [N]}`` the values the classifier reads in each generation.
    """
    names = sorted(prompted)
    if not names:
        raise ValueError("attribute_coverage needs at least one attribute")
    asked = list(zip(*(np.asarray(prompted[a]).tolist() for a in names)))
    shown = list(zip(*(np.asarray(predicted[a]).tolist() for a in names)))
    if len(asked) != len(pred_subjects) or len(shown) != len(pred_subjects):
        raise ValueError("prompted, predicted and pred_subjects must have one entry per generation")
    combos = set(asked)
    covered = {a for a, s, who in zip(asked, shown, pred_subjects) if who == subject and a == s}
    return len(covered) / len(combos)


def copy_and_coverage(table: pd.DataFrame, *, subjects: Sequence[str], images: np.ndarray, pred: dict,
                      prompted: dict[str, np.ndarray] | None, train_set, eval_set) -> pd.DataFrame:
    """``table`` with ``copy`` and ``proximity`` columns (and ``coverage`` where attributes are
    known) per class."""
    subj = np.asarray(subjects, dtype=object)
    train_subj = np.asarray(train_set.subjects, dtype=object)
    real_subj = np.asarray(eval_set.subjects, dtype=object)
    copies, proximity, cover = [], [], []
    for c in table["subject"]:
        rows = subj == c
        train_rows, real_rows = train_subj == c, real_subj == c
        if train_rows.any() and real_rows.any():
            ratios = proximity_ratios(images[rows], train_set.images[train_rows], eval_set.images[real_rows])
            copies.append(float((ratios < COPY_MARGIN).mean()))
            proximity.append(float(np.median(ratios)))
        else:
            copies.append(np.nan)
            proximity.append(np.nan)
        if prompted is not None:
            cover.append(attribute_coverage(
                np.asarray(pred["subject"], dtype=object)[rows], c,
                {a: v[rows] for a, v in prompted.items()},
                {a: np.asarray(pred["attrs"][a])[rows] for a in prompted}))
    table = table.copy()
    table["copy"] = copies
    table["proximity"] = proximity
    if prompted is not None:
        table["coverage"] = cover
    return table


# ---------------------------------------------------------------------------- the protocol
def evaluate_model(model, eval_set, evaluator, train_counts: dict[str, int], *,
                   sample_cfg: SampleConfig = EVAL_SAMPLE, sample_seeds: int = 1, train_set=None):
    """Generate ``sample_seeds`` images per evaluation caption and score them.

    Seeds follow :func:`sampling_seeds` (round 0: seed = row index). With ``train_set`` the
    table also has the ``copy`` and ``coverage`` columns (:func:`copy_and_coverage`).

    :returns: (per-class table, bucket summary, generated images uint8 [N x H x W x 3]).
    """
    from pogdiff.evaluation import metrics
    from pogdiff.model.sampling import generate

    captions = list(eval_set.captions) * sample_seeds
    subjects = list(eval_set.subjects) * sample_seeds
    images = generate(model, captions, sampling_seeds(len(eval_set), sample_seeds), sample_cfg)
    pred = evaluator.predict(images)
    real_feats = evaluator.features(eval_set.images)
    targets = {k: np.tile(v, sample_seeds) for k, v in attr_targets(eval_set).items()}
    table = metrics.per_class_table(
        subjects_gen=subjects, pred_gen=pred["subject"], gen_feats=pred["features"],
        real_subjects=eval_set.subjects, real_feats=real_feats, train_counts=train_counts,
        attr_pred=pred["attrs"], attr_target=targets,
    )
    if train_set is not None:
        table = copy_and_coverage(table, subjects=subjects, images=images, pred=pred,
                                  prompted={a: targets[a] for a in ATTRIBUTES if a in targets},
                                  train_set=train_set, eval_set=eval_set)
    summary = metrics.summarise(
        table, gen_feats_all=pred["features"], real_feats_all=real_feats,
        gen_subjects_all=subjects, real_subjects_all=eval_set.subjects,
    ).reset_index()
    return table, summary, images
