"""The user-data judge checked on the demo set (BENCHMARKS.md "The user-data judge checked on the
demo"): ``python -m pogdiff bench judge --demo [--backbone] [--agreement] [--out FILE.json]``.

The judge (:class:`pogdiff.evaluation.user_judge.UserJudge`) is fitted on the demo's training images as the Compare
tab fits it on a user's: its held-out reliability per shot bucket, its accuracy on the demo's
evaluation images beside the shipped evaluator's and, with ``--agreement``, how often the two
name the same identity on generations of the shipped demo checkpoints (README "Metrics on your
own data" quotes the figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pogdiff.evaluation.user_judge import UserJudge


def demo_report(*, backbone: bool = False, agreement: bool = False) -> dict[str, Any]:
    """The judge on the demo set: held-out reliability on its training images, per shot bucket, and
    accuracy on the demo's evaluation images beside the shipped evaluator's (README "Metrics on
    your own data")."""
    from pogdiff.config import DataConfig
    from pogdiff.constants import SHIPPED_DIR
    from pogdiff.data import ensure_demo, load_image_text_set
    from pogdiff.data.stats import shot_bucket
    from pogdiff.evaluation.demo_classifier import load_evaluator

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
    from pogdiff.model import checkpoints
    from pogdiff.evaluation import protocol as evaluation
    from pogdiff.constants import SHIPPED_DIR
    from pogdiff.model.sampling import generate

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


def add_parsers(bench) -> None:
    """Register ``judge`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    p = bench.add_parser("judge", help="how well the user-data judge does on the demo set")
    p.add_argument("--demo", action="store_true", required=True, help="fit and check it on the demo set")
    p.add_argument("--backbone", action="store_true",
                   help="also join the shipped evaluator's features (off in the app: measured worse)")
    p.add_argument("--agreement", action="store_true",
                   help="also generate with the shipped demo checkpoints and compare the judge's verdicts "
                        "with the shipped evaluator's (a few minutes on CPU)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.set_defaults(fn=main)


def main(args) -> int:
    """``bench judge``: print the figures as JSON and write them to ``--out``."""
    text = json.dumps(demo_report(backbone=args.backbone, agreement=args.agreement), indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
