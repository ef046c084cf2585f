"""A baseline's knob chosen on held-out images, not on the evaluation split (BENCHMARKS.md "Quality").

``python -m pogdiff bench tune --data demo --recipe cbdm --knob cbdm_tau --values 0.01 0.1 1``
fine-tunes the recipe once per value (training seed 0, the quality protocol's budget and batch),
scores each checkpoint on the embedded set's *validation* split (held-out images of the same
identities, drawn apart from the evaluation split), chooses the value with the best class-mean
accuracy over all classes (every class counts alike, so a knob cannot buy the head with the tail
or the other way round), and then scores the chosen run on the evaluation split. Each value's
runs stay in ``<out>/<recipe>-<knob>-<value>/`` (a ``bench quality`` output folder, so ``bench
combine`` reads the chosen one); ``<out>/tuning.json`` holds, per set and recipe, the knob, the
validation scores of every value and the choice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

CRITERION = "all"  # the bucket whose accuracy chooses the knob: the mean over all classes
BUCKETS = ("few", "medium", "many", "all")


def value_folder(out: Path, recipe: str, knob: str, value: float) -> Path:
    return Path(out) / f"{recipe}-{knob.replace('.', '_')}-{value:g}"


def validation_scores(report: pd.DataFrame, recipe: str) -> dict[str, float]:
    """Mean accuracy per bucket of one recipe in a ``bench quality`` report (one row per bucket)."""
    rows = report[report["method"] == recipe].set_index("bucket")["accuracy_mean"].dropna()  # empty buckets: NaN
    return {b: round(float(rows[b]), 6) for b in BUCKETS if b in rows.index}


def choose(scores: dict[str, dict[str, float]]) -> str:
    """The value (a key of ``scores``) with the best ``CRITERION`` accuracy; ties go to the first listed."""
    if not scores:
        raise ValueError("no value was scored")
    return max(scores, key=lambda v: scores[v].get(CRITERION, float("-inf")))


def tune(*, data: str, recipe: str, knob: str, values: list[float], out: Path, seed: int = 0,
         steps: int | None = None, quick: bool = False) -> dict:
    """Fine-tune ``recipe`` at each ``knob`` value, choose on the validation split, score the choice
    on the evaluation split; merge the record into ``out/tuning.json`` and return it."""
    from pogdiff.bench.quality import quality

    scores = {}
    for value in values:
        report = quality(out=value_folder(out, recipe, knob, value), methods=[recipe], seeds=[seed], steps=steps,
                         budgets=[], quick=quick, overrides=[f"{knob}={value:g}"], data=data, split="val")
        scores[f"{value:g}"] = validation_scores(report, recipe)
        logger.info("%s %s=%g: validation %s", recipe, knob, value, scores[f"{value:g}"])
    chosen = choose(scores)
    test = quality(out=value_folder(out, recipe, knob, float(chosen)), methods=[recipe], seeds=[seed], steps=steps,
                   budgets=[], quick=quick, overrides=[f"{knob}={chosen}"], data=data, split="eval")
    record = {"knob": knob, "values": [f"{v:g}" for v in values], "criterion": f"{CRITERION}-class mean accuracy",
              "validation": scores, "chosen": chosen, "seed": seed,
              "evaluation": validation_scores(test, recipe),
              "records": str(value_folder(out, recipe, knob, float(chosen)))}
    path = Path(out) / "tuning.json"
    tuning = json.loads(path.read_text()) if path.is_file() else {}
    tuning.setdefault(data, {})[recipe] = record
    path.write_text(json.dumps(tuning, indent=2, sort_keys=True) + "\n")
    return record


def add_parsers(bench) -> None:
    """Register ``tune`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    from pogdiff.config import RECIPES

    p = bench.add_parser("tune", help="choose a baseline's knob on the validation split")
    p.add_argument("--data", choices=("demo", "families"), default="demo", help="embedded benchmark set")
    p.add_argument("--recipe", choices=list(RECIPES), required=True, help="the recipe whose knob is chosen")
    p.add_argument("--knob", required=True, help="a TrainConfig/PsiConfig field, e.g. cbdm_tau or psi.psi_max")
    p.add_argument("--values", type=float, nargs="+", required=True, help="the values tried")
    p.add_argument("--seed", type=int, default=0, help="training seed of the tuning runs")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning budget (default: the quality benchmark's)")
    p.add_argument("--out", default="results/quality/tuning", help="the runs of each value and tuning.json")
    p.add_argument("--quick", action="store_true", help="tiny size for tests")
    p.set_defaults(fn=main)


def main(args) -> int:
    record = tune(data=args.data, recipe=args.recipe, knob=args.knob, values=args.values, out=Path(args.out),
                  seed=args.seed, steps=args.steps, quick=args.quick)
    print(json.dumps(record, indent=2))
    return 0
