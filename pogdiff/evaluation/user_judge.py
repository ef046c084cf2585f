"""A judge for the user's own classes: a classifier trained on their images.

The shipped evaluator knows only the demo identities. On a user's data set the Compare tab's
metrics need a classifier of *that* set's classes, so one is fitted here on the set's real
images (README "Metrics on your own data"):

- **Features** (numpy, on the image shrunk to ``WORK_SIZE`` px): a colour histogram of the
  *foreground* (each pixel weighted by how far its colour is from the image's border colour, so
  a varied background does not drown the subject's colours; :func:`colour_histogram`,
  :func:`foreground_weights`) and a gradient-orientation histogram over a 2 x 2 grid of cells
  (shape and layout; :func:`gradient_histogram`), each block L2-normalised, joined.
- **Classifier**: scikit-learn's logistic regression with ``class_weight="balanced"``, so a rare
  class is not outvoted by the frequent ones. The blocks are already on one scale; standardising
  them was measured to hurt (it blows up histogram bins that are almost always empty).
- **Reliability**: each image is also classified by a judge fitted *without* it (stratified
  folds: a class's images are spread over the folds, so every class with two or more images
  has one out and the rest in). A class's *reliability* is the share of its held-out real
  images the judge names correctly. A class with one image cannot be checked (NaN). Below
  :data:`WEAK_BELOW` the judge is too weak to score that class, and the app says so.

The judge that scores generations is the one fitted on all the images.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

WEAK_BELOW = 0.5  # held-out recall under which a class's scores are flagged as unreliable
FOLDS = 5
WORK_SIZE = 32  # features are computed on the image resized to this many pixels (antialiased)
HIST_BINS = 4  # colour histogram: bins per RGB channel (4**3 = 64 joint bins)
FOREGROUND_LOW, FOREGROUND_SCALE = 0.1, 0.15  # RGB distance (0..sqrt 3) from the border colour: weight 0 -> 1
GRAD_CELLS, GRAD_ORIENTATIONS = 2, 8  # gradient histogram: cells per side, unsigned orientation bins
CLASSIFIER_C = 0.1  # inverse L2 strength of the logistic regression
JUDGE_VERSION = 2  # part of every cache key; bump when features or classifier change


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def resized(images: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, size, size, 3]`` in [0, 1] (antialiased bilinear;
    unchanged apart from the scale when the images already have that size)."""
    import torch
    import torch.nn.functional as F

    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got shape {x.shape}")
    out = x.astype(np.float32) / 255.0
    if len(out) and out.shape[1:3] != (size, size):
        t = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = t.permute(0, 2, 3, 1).clamp(0, 1).numpy()
    return out


def foreground_weights(x: np.ndarray, *, border: int = 2, low: float = FOREGROUND_LOW,
                       scale: float = FOREGROUND_SCALE) -> np.ndarray:
    """How much each pixel belongs to the subject rather than the background: float ``[N, H, W]``
    in [0, 1] for float images ``x [N, H, W, 3]`` in [0, 1].

    The background colour of an image is the per-channel median of its ``border``-pixel frame; a
    pixel at RGB distance ``d`` from it weighs ``clip((d - low) / scale, 0, 1)`` (noise of the
    background stays below ``low``; a colour ``low + scale`` away counts fully).
    """
    n, h, w, _ = x.shape
    frame = np.zeros((h, w), dtype=bool)
    frame[:border], frame[-border:], frame[:, :border], frame[:, -border:] = True, True, True, True
    background = np.median(x[:, frame], axis=1)  # [N, 3]
    dist = np.linalg.norm(x - background[:, None, None, :], axis=-1)
    return np.clip((dist - low) / scale, 0.0, 1.0).astype(np.float32)


def colour_histogram(x: np.ndarray, weights: np.ndarray | None = None, bins: int = HIST_BINS) -> np.ndarray:
    """Joint RGB histogram, float32 ``[N, bins**3]``, of float images ``x [N, H, W, 3]`` in [0, 1].

    Each pixel adds its ``weights [N, H, W]`` (1 when None), spread over the 8 nearest bin centres
    (trilinear, bin centres at ``0, 1/(bins-1), ..., 1``), so a colour near a bin edge does not
    jump from one bin to the next. Rows are normalised to sum 1, then square-rooted (the Hellinger
    map: a dot product of two rows is the Bhattacharyya coefficient). An all-zero weight row
    gives zeros.
    """
    n = len(x)
    pos = x.reshape(n, -1, 3).astype(np.float64) * (bins - 1)
    lo = np.clip(np.floor(pos), 0, bins - 2).astype(np.int64)
    frac = pos - lo
    wts = np.ones(pos.shape[:2]) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n, -1)
    rows = np.repeat(np.arange(n), pos.shape[1]) * bins ** 3
    out = np.zeros(n * bins ** 3)
    for corner in range(8):
        step = [(corner >> k) & 1 for k in range(3)]
        share = wts.copy()
        idx = np.zeros_like(lo[..., 0])
        for k in range(3):
            share *= frac[..., k] if step[k] else 1.0 - frac[..., k]
            idx = idx * bins + lo[..., k] + step[k]
        out += np.bincount(rows + idx.ravel(), weights=share.ravel(), minlength=len(out))
    out = out.reshape(n, bins ** 3)
    out /= np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(out).astype(np.float32)


def gradient_histogram(x: np.ndarray, cells: int = GRAD_CELLS, orientations: int = GRAD_ORIENTATIONS) -> np.ndarray:
    """HOG-like shape feature, float32 ``[N, cells * cells * orientations]``, L2-normalised rows.

    On the grey image (mean of RGB) of float images ``x [N, H, W, 3]``: central-difference
    gradients, their unsigned orientation in ``[0, pi)`` cut into ``orientations`` bins, and per
    cell of a ``cells x cells`` grid the sum of the gradient magnitudes in each bin.
    """
    grey = x.mean(axis=-1)
    n, h, w = grey.shape
    gx, gy = np.zeros_like(grey), np.zeros_like(grey)
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    gy[:, 1:-1] = grey[:, 2:] - grey[:, :-2]
    mag = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    obin = np.minimum((angle / np.pi * orientations).astype(np.int64), orientations - 1)
    cell = (np.arange(h) * cells // h)[:, None] * cells + (np.arange(w) * cells // w)[None, :]  # [H, W]
    idx = (np.arange(n)[:, None, None] * cells * cells + cell[None]) * orientations + obin
    out = np.bincount(idx.ravel(), weights=mag.ravel(), minlength=n * cells * cells * orientations)
    return _unit(out.reshape(n, -1))


def stratified_folds(subjects: Sequence[str], folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index of each image, ``[N]`` int; -1 for images of one-image classes (never held out).

    A class with ``n >= 2`` images has them shuffled (``seed``) and dealt over
    ``min(folds, n)`` folds, so whichever fold is held out, at least one of its images stays in.
    """
    labels = np.asarray(subjects, dtype=object)
    out = np.full(len(labels), -1, dtype=int)
    rng = np.random.default_rng(seed)
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        idx = idx[rng.permutation(len(idx))]
        out[idx] = np.arange(len(idx)) % min(folds, len(idx))
    return out


def _classifier(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(class_weight="balanced", max_iter=2000, C=CLASSIFIER_C, random_state=seed)


@dataclass
class UserJudge:
    """Classifier of a data set's own classes (see the module docstring).

    :param backbone: optionally an image feature network with a ``features(images) -> [N, F]``
        method (the shipped :class:`pogdiff.evaluation.demo_classifier.Evaluator`), whose features are joined as one
        more block. Off by default: on the demo set and on simple shapes it made the judge worse
        (BENCHMARKS.md "The user-data judge checked on the demo").
    """

    backbone: Any = None
    folds: int = FOLDS
    seed: int = 0
    subjects: list[str] = field(default_factory=list)
    reliability: pd.DataFrame | None = None  # subject, n_images, n_heldout, reliability, weak
    _clf: Any = None

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, F]``, L2-normalised rows: the foreground colour
        histogram and the gradient histogram of the image at ``WORK_SIZE`` px (module docstring)."""
        x = resized(images)
        parts = [_unit(colour_histogram(x, foreground_weights(x))), gradient_histogram(x)]
        if self.backbone is not None:
            parts.insert(0, _unit(np.asarray(self.backbone.features(images), dtype=np.float32)))
        return _unit(np.concatenate(parts, axis=1))

    def fit(self, images: np.ndarray, subjects: Sequence[str]) -> UserJudge:
        """Fit on real images ``[N, H, W, 3]`` with their ``[N]`` classes; measure reliability first."""
        if len(images) != len(subjects):
            raise ValueError(f"got {len(images)} images but {len(subjects)} classes")
        labels = np.asarray(subjects, dtype=object)
        classes = sorted(set(labels.tolist()))
        if len(classes) < 2:
            raise ValueError("a judge of the data set's classes needs at least 2 classes; this set has "
                             f"{len(classes)}. Choose another class source in the Data tab.")
        feats = self.features(images)
        fold = stratified_folds(labels, self.folds, self.seed)
        heldout = np.full(len(labels), None, dtype=object)
        for f in range(self.folds):
            test = fold == f
            if not test.any():
                continue
            train = ~test
            if len(set(labels[train].tolist())) < 2:
                continue
            clf = _classifier(self.seed).fit(feats[train], labels[train])
            heldout[test] = clf.predict(feats[test])
        rows = []
        for c in classes:
            mask = labels == c
            checked = mask & (fold >= 0)
            n_out = int(checked.sum())
            rel = float(np.mean(heldout[checked] == c)) if n_out else math.nan
            rows.append({"subject": c, "n_images": int(mask.sum()), "n_heldout": n_out, "reliability": rel,
                         "weak": bool(n_out == 0 or rel < WEAK_BELOW)})
        self.reliability = pd.DataFrame(rows)
        self._clf = _classifier(self.seed).fit(feats, labels)
        self.subjects = classes
        return self

    def predict(self, images: np.ndarray) -> dict[str, Any]:
        """``{"subject": [N] class names, "features": [N, F]}`` for uint8 ``[N, H, W, 3]`` images."""
        if self._clf is None:
            raise RuntimeError("UserJudge.predict called before fit")
        feats = self.features(images)
        return {"subject": [str(s) for s in self._clf.predict(feats)], "features": feats}

    def heldout_accuracy(self) -> float:
        """Class-balanced held-out accuracy: the mean reliability over the classes that could be checked."""
        if self.reliability is None:
            raise RuntimeError("UserJudge.heldout_accuracy called before fit")
        vals = self.reliability["reliability"].dropna()
        return float(vals.mean()) if len(vals) else math.nan

    def weak_subjects(self) -> list[str]:
        if self.reliability is None:
            return []
        return list(self.reliability.loc[self.reliability["weak"], "subject"])


def dataset_digest(images: np.ndarray, captions: Sequence[str], subjects: Sequence[str]) -> str:
    """Content hash of a loaded set (pixels, captions, classes) for cache keys."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    for text in (*captions, "\x00", *subjects):
        h.update(text.encode("utf-8", "surrogatepass") + b"\x1f")
    return h.hexdigest()


def prompt_rows(subjects: Sequence[str], per_class: int | None, seed: int = 0) -> list[int]:
    """Rows whose captions prompt the generations: up to ``per_class`` per class (all when None),
    spread evenly over the class's rows, in row order."""
    labels = np.asarray(subjects, dtype=object)
    rows: list[int] = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        if per_class is not None and len(idx) > per_class:
            idx = idx[np.linspace(0, len(idx) - 1, per_class).round().astype(int)]
        rows.extend(int(i) for i in idx)
    return sorted(rows)


def score_on_own_data(model, ds, judge: UserJudge, train_counts: dict[str, int], *, per_class: int | None,
                      sample_cfg, config=None) -> pd.DataFrame:
    """Generate one image per chosen caption of the loaded set (seed = its position) and score it
    with ``judge`` against the set's real images; the judge's reliability joined per class.

    :returns: :func:`pogdiff.evaluation.metrics.per_class_table` columns plus ``judge_reliability`` and
        ``judge_weak``.
    """
    from pogdiff.evaluation import metrics
    from pogdiff.config import DataConfig
    from pogdiff.model.sampling import generate

    rows = prompt_rows(ds.subjects, per_class)
    captions = [ds.captions[i] for i in rows]
    subjects = [ds.subjects[i] for i in rows]
    images = generate(model, captions, list(range(len(captions))), sample_cfg)
    pred = judge.predict(images)
    real_feats = judge.features(ds.images)
    table = metrics.per_class_table(
        subjects_gen=subjects, pred_gen=pred["subject"], gen_feats=pred["features"],
        real_subjects=list(ds.subjects), real_feats=real_feats, train_counts=train_counts,
        config=config or DataConfig(),
    )
    rel = judge.reliability.set_index("subject")
    table["judge_reliability"] = table["subject"].map(rel["reliability"]).astype(float)
    table["judge_weak"] = table["subject"].map(rel["weak"]).astype(bool)
    return table
