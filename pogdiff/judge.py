"""A judge for the user's own classes: a classifier trained on their images.

The shipped evaluator knows only the demo identities. On a user's data set the Compare tab's
metrics need a classifier of *that* set's classes, so one is fitted here on the set's real
images (README "Metrics on your own data"):

- **Features**: the shipped evaluator's feature layer (when it is there) and the image shrunk
  to ``pixel_size`` x ``pixel_size`` (colour and layout), each block L2-normalised, joined.
- **Classifier**: scikit-learn's logistic regression on standardised features with
  ``class_weight="balanced"``, so a rare class is not outvoted by the frequent ones.
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
PIXEL_SIZE = 8
JUDGE_VERSION = 1  # part of every cache key; bump when features or classifier change


def pixel_features(images: np.ndarray, size: int = PIXEL_SIZE) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3 * size**2]``: the image resized (antialiased) to
    ``size x size`` in [-1, 1], flattened and L2-normalised."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if len(x):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.flatten(1)
    return F.normalize(x, dim=1).numpy().astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


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
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                              C=1.0, random_state=seed))


@dataclass
class UserJudge:
    """Classifier of a data set's own classes (see the module docstring).

    :param backbone: an image feature network with a ``features(images) -> [N, F]`` method (the
        shipped :class:`pogdiff.evaluator.Evaluator`), or None for pixel features only.
    """

    backbone: Any = None
    pixel_size: int = PIXEL_SIZE
    folds: int = FOLDS
    seed: int = 0
    subjects: list[str] = field(default_factory=list)
    reliability: pd.DataFrame | None = None  # subject, n_images, n_heldout, reliability, weak
    _clf: Any = None

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, F]``, L2-normalised rows."""
        parts = [pixel_features(images, self.pixel_size)]
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

    :returns: :func:`pogdiff.metrics.per_class_table` columns plus ``judge_reliability`` and
        ``judge_weak``.
    """
    from pogdiff import metrics
    from pogdiff.config import DataConfig
    from pogdiff.sampling import generate

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


def demo_report(*, backbone: bool = True, agreement: bool = False) -> dict[str, Any]:
    """The judge on the demo set: held-out reliability on its training images, per shot bucket, and
    accuracy on the demo's evaluation images beside the shipped evaluator's (README "Metrics on
    your own data")."""
    from pogdiff.config import DataConfig
    from pogdiff.constants import SHIPPED_DIR
    from pogdiff.data import ensure_demo, load_image_text_set
    from pogdiff.data.stats import shot_bucket
    from pogdiff.evaluator import load_evaluator

    cfg = DataConfig()
    root = ensure_demo()
    train, evalset = load_image_text_set(root / "train", cfg), load_image_text_set(root / "eval", cfg)
    evaluator = load_evaluator(SHIPPED_DIR / "evaluator")
    judge = UserJudge(backbone=evaluator if backbone else None).fit(train.images, train.subjects)
    counts = pd.Series(train.subjects).value_counts()
    rel = judge.reliability.assign(shot=lambda t: [shot_bucket(int(counts[s]), cfg) for s in t["subject"]])
    truth = np.asarray(evalset.subjects, dtype=object)
    out = {
        "train_images": len(train), "classes": len(judge.subjects), "backbone": backbone,
        "heldout_accuracy": round(judge.heldout_accuracy(), 4),
        "heldout_by_shot": {k: round(float(v), 4) for k, v in rel.groupby("shot")["reliability"].mean().items()},
        "weak_classes": judge.weak_subjects(),
        "eval_images": len(evalset),
        "eval_accuracy_judge": round(float(np.mean(np.asarray(judge.predict(evalset.images)["subject"]) == truth)), 4),
        "eval_accuracy_shipped_evaluator": round(float(np.mean(
            np.asarray(evaluator.predict(evalset.images)["subject"], dtype=object) == truth)), 4),
    }
    if agreement:
        out["agreement_on_generations"] = _agreement(judge, evaluator, evalset, train)
    return out


def _agreement(judge: UserJudge, evaluator, evalset, train) -> dict[str, Any]:
    """On generations of the shipped demo checkpoints (the metrics' fast protocol): how often the
    judge names the same identity as the shipped evaluator, and both one's accuracy per checkpoint."""
    from pogdiff import checkpoints, evaluation
    from pogdiff.constants import SHIPPED_DIR
    from pogdiff.sampling import generate

    part = evaluation.metric_eval_set(evalset, "fast")
    truth = np.asarray(part.subjects, dtype=object)
    found = {}
    for name in ("demo-baseline", "demo-pogdiff"):
        ckpt = checkpoints.latest_checkpoint(SHIPPED_DIR / name) or SHIPPED_DIR / name
        model = checkpoints.load_model(ckpt, device="cpu")
        images = generate(model, list(part.captions), list(range(len(part.captions))), evaluation.EVAL_SAMPLE)
        by_judge = np.asarray(judge.predict(images)["subject"], dtype=object)
        by_evaluator = np.asarray(evaluator.predict(images)["subject"], dtype=object)
        found[name] = {"images": len(images), "agree": round(float(np.mean(by_judge == by_evaluator)), 4),
                       "accuracy_judge": round(float(np.mean(by_judge == truth)), 4),
                       "accuracy_evaluator": round(float(np.mean(by_evaluator == truth)), 4)}
    return found


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="How well the user-data judge does on the demo set.")
    parser.add_argument("--demo", action="store_true", required=True, help="fit and check it on the demo set")
    parser.add_argument("--pixels-only", action="store_true", help="without the shipped evaluator's features")
    parser.add_argument("--agreement", action="store_true",
                        help="also generate with the shipped demo checkpoints and compare the judge's verdicts "
                             "with the shipped evaluator's (a few minutes on CPU)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    text = json.dumps(demo_report(backbone=not args.pixels_only, agreement=args.agreement), indent=2)
    print(text)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
