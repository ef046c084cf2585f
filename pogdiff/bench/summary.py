"""The blocks of ``summary.json`` and ``budget.json`` (BENCHMARKS.md "Quality"): every recipe's
per-seed bucket metrics and the paired comparisons (per-seed ratios, the ratio of class means with
its bootstrap interval over classes, copy-rate difference, generation shift)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pogdiff.config import COMPARED

# Buckets and metrics copied per seed into summary.json (name -> (bucket, summary column)).
SUMMARY_METRICS = {
    "few_acc": ("few", "accuracy"), "medium_acc": ("medium", "accuracy"), "many_acc": ("many", "accuracy"),
    "all_acc": ("all", "accuracy"), "few_grecall": ("few", "gRecall"), "medium_grecall": ("medium", "gRecall"),
    "few_fd": ("few", "FD"), "medium_fd": ("medium", "FD"), "many_fd": ("many", "FD"), "all_fd": ("all", "FD"),
    "few_copy": ("few", "copy"), "medium_copy": ("medium", "copy"), "many_copy": ("many", "copy"),
    "all_copy": ("all", "copy"), "few_coverage": ("few", "coverage"), "medium_coverage": ("medium", "coverage"),
    "many_coverage": ("many", "coverage"), "many_grecall": ("many", "gRecall"),
    "few_proximity": ("few", "proximity"), "many_proximity": ("many", "proximity"),
    "all_coverage": ("all", "coverage"), "all_proximity": ("all", "proximity"),
}


def summary_entry(long: pd.DataFrame, classes: pd.DataFrame, *, steps: int, seeds: list[int], batch_size: int,
                  n_eval_captions: int, overrides: list[str], compared: tuple[str, ...] = COMPARED,
                  **protocol) -> dict:
    """One benchmark set's block of ``summary.json``: per-seed bucket metrics of every recipe and the
    paired comparisons of the ``compared`` recipes against each other recipe, each pair once
    (README "Results")."""
    methods = list(dict.fromkeys(long["method"]))
    block: dict = {"steps": steps, "seeds": seeds, "batch_size": batch_size, "n_eval_captions": n_eval_captions,
                   "overrides": overrides, **protocol, "methods": {}, "comparisons": {}}
    for method in methods:
        rows = long[long["method"] == method]
        block["methods"][method] = {
            name: [_clean(_bucket_value(rows, seed, bucket, col)) for seed in seeds]
            for name, (bucket, col) in SUMMARY_METRICS.items()
        }
    for i, a in enumerate(compared):
        if a in methods:
            for other in methods:
                if other != a and other not in compared[:i]:
                    block["comparisons"][f"{a}_vs_{other}"] = _compare(block["methods"], classes, a, other)
    return block


def _compare(per_method: dict, classes: pd.DataFrame, a: str, b: str) -> dict:
    """Paired comparison of recipe ``a`` against ``b`` per bucket: per-seed accuracy ratios, the
    ratio of class means with its bootstrap interval over classes (and its relative half-width),
    and the difference in copy rate."""
    from pogdiff.evaluation import comparison

    out = {}
    for bucket in ("few", "medium", "many"):
        va, vb = (_nan(per_method[m][f"{bucket}_acc"]) for m in (a, b))
        both = [i for i, (x, y) in enumerate(zip(va, vb)) if np.isfinite(x) and np.isfinite(y)]
        common = sorted(set(classes.loc[classes["method"] == a, "seed"]) & set(classes.loc[classes["method"] == b, "seed"]))
        va, vb = [va[i] for i in both], [vb[i] for i in both]
        ratios = comparison.paired_ratios(va, vb)
        part = classes[(classes["shot"] == bucket) & classes["seed"].isin(common)]
        by_class = part.groupby(["method", "subject"])["accuracy"].mean().unstack(0)
        entry = {"paired_ratio": [_clean(r) for r in ratios], "paired_seeds": common,
                 "every_seed_above_1": bool(ratios) and bool(all(r > 1 for r in ratios)),
                 "mean_difference": _clean(float(np.mean(va) - np.mean(vb))) if both else None}
        ca, cb = per_method[a].get(f"{bucket}_copy"), per_method[b].get(f"{bucket}_copy")
        if ca and cb:
            pairs = [(x, y) for x, y in zip(ca, cb) if x is not None and y is not None]
            if pairs:
                entry["copy_difference"] = _clean(float(np.mean([x - y for x, y in pairs])))
        if a in by_class and b in by_class and len(by_class):
            ratio, low, high = comparison.bootstrap_ratio_ci(by_class[a].values, by_class[b].values)
            entry.update(ratio_of_means=_clean(ratio), bootstrap_ci95=[_clean(low), _clean(high)],
                         n_classes=int(len(by_class)))
            if np.isfinite(ratio) and ratio > 0 and np.isfinite(low) and np.isfinite(high):
                entry["ci_half_width_relative"] = _clean((high - low) / (2 * ratio))
            grid = part.pivot_table(index=["seed", "subject"], columns="method", values="accuracy")
            if a in grid and b in grid:
                mat_a, mat_b = (grid[m].unstack("subject").values for m in (a, b))  # [S, C] each
                if np.isfinite(mat_a).all() and np.isfinite(mat_b).all():
                    _, h_low, h_high = comparison.hierarchical_ratio_ci(mat_a, mat_b)
                    entry["hierarchical_ci95"] = [_clean(h_low), _clean(h_high)]
        out[bucket] = entry
    return out


def generation_shift(images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray:
    """RMS pixel difference (pixels in [0, 1]) of paired generations, same caption and seed: ``[N]``.

    The PoG term's share of the loss is small even where it changes the model (README "Is PoGDiff
    doing anything?"); how far the generations of two paired runs move apart is what a user sees.
    """
    a = np.asarray(images_a, dtype=np.float64) / 255.0
    b = np.asarray(images_b, dtype=np.float64) / 255.0
    if a.shape != b.shape:
        raise ValueError(f"paired generations differ in shape: {a.shape} vs {b.shape}")
    return np.sqrt(((a - b) ** 2).reshape(len(a), -1).mean(axis=1))


def add_generation_shifts(block: dict, generated: dict, subjects: list[str], counts: dict, *, seeds, steps: int) -> None:
    """Each comparison's mean generation shift per bucket (over seeds and images), beside the
    shift between two training seeds of the same recipe as the scale of chance."""
    from pogdiff.data.stats import shot_bucket

    shots = np.asarray([shot_bucket(counts[s]) for s in subjects], dtype=object)
    for name, comp in block["comparisons"].items():
        a, b = name.split("_vs_")
        pairs = [(generated[(a, seed, steps)], generated[(b, seed, steps)]) for seed in seeds
                 if (a, seed, steps) in generated and (b, seed, steps) in generated]
        if not pairs:
            continue
        shift = np.concatenate([generation_shift(x, y)[None] for x, y in pairs])  # [S, N]
        for bucket, entry in comp.items():
            entry["generation_shift"] = _clean(float(shift[:, shots == bucket].mean()))
    for method in block["methods"]:
        runs = [generated[(method, seed, steps)] for seed in seeds if (method, seed, steps) in generated]
        if len(runs) >= 2:
            block["methods"][method]["seed_to_seed_shift"] = _clean(float(generation_shift(runs[0], runs[1]).mean()))


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _bucket_value(rows: pd.DataFrame, seed: int, bucket: str, col: str) -> float:
    hit = rows[(rows["seed"] == seed) & (rows["bucket"] == bucket)]
    return float(hit[col].iloc[0]) if len(hit) and col in hit else float("nan")


def _clean(x: float) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def merge_summary(path: Path, data: str, entry: dict) -> None:
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[data] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of every metric, per method and bucket."""
    metric_cols = [c for c in long.columns if c not in ("method", "seed", "bucket", "n_classes", "n_gen")]
    grouped = long.groupby(["method", "bucket"], sort=False)[metric_cols]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    res = mean.add_suffix("_mean").join(std.add_suffix("_std")).reset_index()
    res["n_seeds"] = long.groupby(["method", "bucket"], sort=False)["seed"].nunique().values
    return res


def to_markdown(report: pd.DataFrame, *, steps: int, seeds) -> str:
    cols = [c[:-5] for c in report.columns if c.endswith("_mean") and c != "train_seconds_mean"]
    lines = [f"Fine-tuning steps: {steps}; training seeds: {list(seeds)}; mean +- std over seeds.", "",
             "| method | bucket | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for _, r in report.iterrows():
        cells = [f"{r[c + '_mean']:.3f} +- {r[c + '_std']:.3f}" for c in cols]
        lines.append(f"| {r['method']} | {r['bucket']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
