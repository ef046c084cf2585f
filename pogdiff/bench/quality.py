"""The speed and quality benchmarks and their report (BENCHMARKS.md "Speed" and "Quality").

- ``bench speed``: PoGDiff step time relative to plain fine-tuning, measured in one run with the
  configurations interleaved (these machines are noisy, so ratios are what we report).
- ``bench quality``: baseline / PoGDiff / CBDM fine-tuned from the same base with the same steps,
  batch and seeds; generations for every evaluation caption with fixed seeds; metrics per class and
  per many / medium / few-shot bucket, mean +- std over training seeds (the protocol is
  :mod:`pogdiff.evaluation`'s); ``results/quality/summary.json`` and ``budget.json``.
- ``bench report``: the markdown tables of a ``summary.json`` and the targets of the default recipe.

Training and checkpoints are imported where they are used, so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pogdiff.constants import REPO_ROOT
from pogdiff.evaluation import EVAL_SAMPLE, evaluate_model, per_class_rows, subset
from pogdiff.constants import SHIPPED_DIR as SHIPPED
from pogdiff.config import (
    COMPARED,
    RECIPES,
    DataConfig,
    PsiConfig,
    SampleConfig,
    TrainConfig,
    model_preset,
    to_dict,
    uses_balanced_sampling,
)

logger = logging.getLogger(__name__)

BASE_DIR = SHIPPED / "base-tiny"
EVALUATOR_DIR = SHIPPED / "evaluator"
# The embedded benchmark sets (README "Results"): the demo spec kind and the evaluator that names them.
DATASETS = {"demo": ("identities", EVALUATOR_DIR), "families": ("families", SHIPPED / "evaluator-families")}
QUALITY_STEPS = 300  # the budget summary.json reports (README "Results": chosen from the budget curve)
QUALITY_BUDGETS = (300, 1000)  # the budget curve's points (budget.json)
QUALITY_BATCH = 16
QUALITY_EVAL_PER_CLASS = 8  # held-out captions per class (all of them)
QUALITY_SAMPLE_SEEDS = 2  # sampling seeds per caption
# The benchmark's sampler: the Compare tab's, with the UNet under bfloat16 autocast (BENCHMARKS
# "Sampling": same accuracy, about twice as fast on this CPU).
BENCH_SAMPLE = dataclasses.replace(EVAL_SAMPLE, precision="bf16")
QUICK_STEPS = 2
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


def _demo_splits(data: str = "demo"):
    from pogdiff.data import DemoSpec, ensure_demo, load_image_text_set

    if data not in DATASETS:
        raise ValueError(f"unknown benchmark set {data!r}; choose one of {', '.join(DATASETS)}")
    root = ensure_demo(DemoSpec(kind=DATASETS[data][0]))
    cfg = DataConfig()
    return root, load_image_text_set(root / "train", cfg), load_image_text_set(root / "eval", cfg)


def _base_or_fresh():
    from pogdiff import checkpoints, models

    if (BASE_DIR / "configs.json").exists():
        return checkpoints.load_model(BASE_DIR), str(BASE_DIR)
    logger.warning("no base checkpoint at %s; using a randomly initialised tiny UNet", BASE_DIR)
    return models.build_tiny(model_preset("tiny")), None


# ------------------------------------------------------------------------------------ speed
def _reencoding_trainer():
    """The naive loop: a :class:`pogdiff.training.Trainer` that encodes the batch's captions with
    the text encoder at every step."""
    from pogdiff.training import Trainer

    class ReencodeTrainer(Trainer):
        def caption_states(self, rows):
            emb = self.model.text_encoder.encode([self.data.captions[i] for i in rows.tolist()])
            return emb.tokens.clone(), emb.mask.clone()

    return ReencodeTrainer


def speed(*, steps: int = 20, warmup: int = 3, batch_size: int = 32, repeats: int = 3) -> pd.DataFrame:
    """Median seconds per step of each configuration, and the ratio to plain fine-tuning."""
    from pogdiff.training import Trainer, prepare_data

    _, train_set, _ = _demo_splits()
    model, _ = _base_or_fresh()
    data = prepare_data(train_set, model, PsiConfig())
    base_cfg = TrainConfig(batch_size=batch_size, max_steps=10**9, checkpoint_every=0, log_every=0)
    configs = {
        "baseline (plain loss)": (Trainer, dataclasses.replace(base_cfg, method="baseline")),
        "pogdiff (neighbour pass only where psi > threshold)": (Trainer, dataclasses.replace(base_cfg, method="pogdiff")),
        "pogdiff naive (neighbour pass for every row)": (
            Trainer, dataclasses.replace(base_cfg, method="pogdiff", psi=PsiConfig(psi_threshold=-1.0))),
        "cbdm (second conditional pass with grad)": (Trainer, dataclasses.replace(base_cfg, method="cbdm")),
        "baseline, captions re-encoded every step": (_reencoding_trainer(), dataclasses.replace(base_cfg, method="baseline")),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    active: dict[str, list[float]] = {name: [] for name in configs}
    init = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    for rep in range(repeats):
        for name, (cls, cfg) in configs.items():
            model.unet.load_state_dict(init)
            trainer = cls(model, data, cfg, run_dir=REPO_ROOT / "runs" / "bench-speed")
            for _ in range(warmup):
                trainer.run_step()
                trainer.step += 1
            t0 = time.perf_counter()
            for _ in range(steps):
                _, psi_stats = trainer.run_step()
                trainer.step += 1
                active[name].append(psi_stats[1])
            times[name].append((time.perf_counter() - t0) / steps)
            logger.info("repeat %d %s: %.4f s/step", rep, name, times[name][-1])
    base = statistics.median(times["baseline (plain loss)"])
    rows = []
    for name in configs:
        med = statistics.median(times[name])
        rows.append({"configuration": name, "s_per_step": round(med, 4), "ratio_to_baseline": round(med / base, 3),
                     "rows_with_neighbour_pass": round(float(np.mean(active[name])), 3)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- quality
def _apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """``psi.psi_max=2`` style overrides, typed after the field's default."""
    for item in items:
        key, _, raw = item.partition("=")
        target, field_name = (cfg.psi, key[4:]) if key.startswith("psi.") else (cfg, key)
        if not hasattr(target, field_name):
            raise ValueError(f"--set {item!r}: unknown field {key!r}")
        old = getattr(target, field_name)
        if isinstance(old, bool) or (old is None and raw.lower() in ("true", "false", "yes", "no")):
            value = raw.lower() in ("1", "true", "yes")
        elif old is None:
            value = None if raw.lower() == "none" else raw
        else:
            value = type(old)(raw)
        if target is cfg.psi:
            cfg = dataclasses.replace(cfg, psi=dataclasses.replace(cfg.psi, **{field_name: value}))
        else:
            cfg = dataclasses.replace(cfg, **{field_name: value})
    return cfg


def recipe_config(name: str, *, seed: int, batch_size: int, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a benchmark recipe (``RECIPES``), with extra ``--set`` overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    cfg = TrainConfig(seed=seed, batch_size=batch_size, log_every=50)
    return _apply_overrides(cfg, RECIPES[name] + list(overrides or []))


def _train_key(cfg: TrainConfig) -> dict:
    """What a benchmark run's weights depend on: its TrainConfig without the step count and the
    checkpoint bookkeeping (a run is read along the way at every budget), and without the psi
    options where the method does not read them."""
    key = to_dict(cfg)
    for name in ("max_steps", "checkpoint_every", "checkpoint_minutes", "checkpoints_total_limit", "log_every",
                 "sample_every", "report_to"):
        key.pop(name, None)
    key["balanced_sampling"] = uses_balanced_sampling(cfg)
    if cfg.method != "pogdiff":
        key.pop("psi")
    if not key["balanced_sampling"]:
        key.pop("balance_alpha")
    return key


def train_to_budgets(run_dir: Path, cfg: TrainConfig, budgets, train_set, *, model_cfg, base) -> dict[int, Path]:
    """Train one run to each budget in turn, resuming, and keep the checkpoint of every budget.

    A run resumed from its ``b``-step checkpoint ends bit for bit where an uninterrupted run ends
    (README "Resuming"), so the budgets' checkpoints are those of one run read along the way. A run
    folder that holds another configuration is refused rather than mixed in.

    :returns: ``{budget: checkpoint folder}``.
    """
    from pogdiff import checkpoints
    from pogdiff.training import train

    run_dir = Path(run_dir)
    budgets = sorted({int(b) for b in budgets})
    cfg = dataclasses.replace(cfg, checkpoint_every=0, checkpoint_minutes=0.0,
                              checkpoints_total_limit=len(budgets) + 1)
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is not None:
        saved = checkpoints.load_configs(latest)[1]
        if saved is not None and _train_key(saved) != _train_key(cfg):
            raise ValueError(f"{run_dir} holds a run with other settings than {_train_key(cfg)}; move it aside "
                             "or choose another --out")
    out = {}
    for budget in budgets:
        ckpt = run_dir / f"checkpoint-{budget:06d}"
        if not (ckpt / "configs.json").exists():
            train(dataset=train_set, model_cfg=model_cfg, train_cfg=dataclasses.replace(cfg, max_steps=budget),
                  run_dir=run_dir, base_checkpoint=base, resume=True)
        out[budget] = ckpt
    return out


def evaluated_checkpoint(ckpt: Path, eval_set, evaluator, counts, *, train_set, sample_cfg: SampleConfig,
                         sample_seeds: int):
    """Evaluate one checkpoint (:func:`pogdiff.evaluation.evaluate_model`), cached beside it in
    ``eval-<step>/`` and keyed by its weights, the captions, the sampler and the sampling seeds."""
    from pogdiff import checkpoints
    from pogdiff.evaluation import checkpoint_digest

    folder = ckpt.parent / f"eval-{ckpt.name.rsplit('-', 1)[-1]}"
    key = json.dumps({"weights": checkpoint_digest(ckpt), "captions": list(eval_set.captions),
                      "sample": to_dict(sample_cfg), "sample_seeds": sample_seeds}, sort_keys=True)
    stamp = folder / "key.json"
    if stamp.exists() and stamp.read_text() == key:
        return (pd.read_csv(folder / "per_class.csv"), pd.read_csv(folder / "summary.csv"),
                np.load(folder / "generated.npy", allow_pickle=False))
    t0 = time.perf_counter()
    model = checkpoints.load_model(ckpt)
    table, summary, images = evaluate_model(model, eval_set, evaluator, counts, sample_cfg=sample_cfg,
                                            sample_seeds=sample_seeds, train_set=train_set)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "per_class.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    np.save(folder / "generated.npy", images, allow_pickle=False)
    stamp.write_text(key)
    logger.info("%s evaluated in %.0fs", ckpt, time.perf_counter() - t0)
    return table, summary, images


def quality(*, out: Path, methods, seeds, budgets=None, steps: int | None = None, quick: bool = False,
            overrides: list[str] | None = None, ship: Path | None = None, data: str = "demo",
            batch_size: int = QUALITY_BATCH, eval_per_class: int = QUALITY_EVAL_PER_CLASS,
            sample_seeds: int = QUALITY_SAMPLE_SEEDS, seeds_for: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """Fine-tune each recipe from the same base for each seed, read every budget, evaluate, report.

    ``seeds_for`` gives some recipes fewer seeds than ``seeds`` (a subset of them); comparisons
    then pair the seeds both recipes have.

    Runs are paired: every recipe sees the same seeds, hence the same timesteps, noise and (except
    where batches are class-balanced) batch rows, and generates from the same captions with the
    same sampling seeds. Each (recipe, seed) is one run, read at every budget of ``budgets``.
    Writes ``out/<data>/`` (tables, plots, grids; runs under ``runs/``), merges the ``steps``
    budget into ``out/summary.json`` and every budget into ``out/budget.json``.
    """
    from pogdiff import checkpoints, metrics
    from pogdiff.evaluator import load_evaluator

    out = Path(out)
    folder = out / data
    folder.mkdir(parents=True, exist_ok=True)
    _, train_set, eval_set = _demo_splits(data)
    eval_set = subset(eval_set, _quick_rows(eval_set) if quick else per_class_rows(eval_set, eval_per_class))
    evaluator = load_evaluator(DATASETS[data][1])
    _, base = _base_or_fresh()
    model_cfg = checkpoints.load_configs(base)[0] if base else model_preset("tiny")
    counts = pd.Series(train_set.subjects).value_counts().to_dict()
    steps = steps or (QUICK_STEPS if quick else QUALITY_STEPS)
    budgets = sorted({int(b) for b in (budgets or [])} | {steps})
    sample_cfg = dataclasses.replace(BENCH_SAMPLE, steps=2) if quick else BENCH_SAMPLE
    sample_seeds = 1 if quick else sample_seeds
    long, per_class, grids, tables, generated = [], [], {}, {}, {}
    subjects = list(eval_set.subjects) * sample_seeds
    seeds_for = {m: list(v) for m, v in (seeds_for or {}).items()}
    unknown = sorted(set(seeds_for) - set(methods))
    stray = {m: sorted(set(v) - set(seeds)) for m, v in seeds_for.items() if set(v) - set(seeds)}
    if unknown or stray:
        raise ValueError(f"--seeds-for names recipes not run ({unknown}) or seeds not in --seeds ({stray})")
    for seed in seeds:
        for method in methods:
            if seed not in seeds_for.get(method, seeds):
                continue
            cfg = recipe_config(method, seed=seed, batch_size=batch_size, overrides=overrides)
            run_dir = folder / "runs" / f"{method}-seed{seed}"
            t0 = time.perf_counter()
            ckpts = train_to_budgets(run_dir, cfg, budgets, train_set, model_cfg=model_cfg, base=base)
            logger.info("%s: trained in %.0fs", run_dir.name, time.perf_counter() - t0)
            for budget, ckpt in ckpts.items():
                table, summary, images = evaluated_checkpoint(ckpt, eval_set, evaluator, counts, train_set=train_set,
                                                              sample_cfg=sample_cfg, sample_seeds=sample_seeds)
                tag = {"method": method, "seed": seed, "steps": budget}
                long.append(summary.assign(**tag))
                per_class.append(table.assign(**tag))
                generated[(method, seed, budget)] = images
                if seed == seeds[0] and budget == steps:
                    tables[method], grids[method] = table, images[: len(eval_set)]
    long_all, classes_all = pd.concat(long, ignore_index=True), pd.concat(per_class, ignore_index=True)
    long_all.to_csv(folder / "summary_all_seeds.csv", index=False)
    classes_all.to_csv(folder / "per_class_all_seeds.csv", index=False)
    at = long_all[long_all["steps"] == steps].drop(columns="steps")
    report = aggregate(at)
    report.to_csv(folder / "results.csv", index=False)
    (folder / "results.json").write_text(report.to_json(orient="records", indent=2))
    (folder / "results.md").write_text(to_markdown(report, steps=steps, seeds=seeds))
    metrics.accuracy_vs_frequency_figure(tables, path=folder / "accuracy_vs_frequency.png")
    _few_shot_grids(folder, eval_set, grids, counts)
    protocol = {"batch_size": batch_size, "n_eval_captions": len(eval_set), "sample_seeds": sample_seeds,
                "sampler": to_dict(sample_cfg), "overrides": overrides or [],
                "recipes": {m: RECIPES[m] for m in methods}, "seeds_for": seeds_for}
    entry = summary_entry(at, classes_all[classes_all["steps"] == steps], steps=steps, seeds=list(seeds), **protocol)
    entry["budgets"] = budgets
    _add_generation_shifts(entry, generated, subjects, counts, seeds=seeds, steps=steps)
    _merge_summary(out / "summary.json", data, entry)
    curve = {"budgets": budgets, "seeds": list(seeds), **protocol, "by_budget": {}}
    for budget in budgets:
        part = long_all[long_all["steps"] == budget].drop(columns="steps")
        block = summary_entry(part, classes_all[classes_all["steps"] == budget], steps=budget, seeds=list(seeds),
                              **protocol)
        _add_generation_shifts(block, generated, subjects, counts, seeds=seeds, steps=budget)
        curve["by_budget"][str(budget)] = block
    _merge_summary(out / "budget.json", data, curve)
    budget_figure(long_all, path=folder / "budget.png", title=data)
    if ship:
        from pogdiff.bench.ship import ship_demo_runs

        ship_demo_runs(folder, Path(ship), seeds[0], tables, steps=steps, prefix="demo" if data == "demo" else data)
    return report


def summary_entry(long: pd.DataFrame, classes: pd.DataFrame, *, steps: int, seeds: list[int], batch_size: int,
                  n_eval_captions: int, overrides: list[str], **protocol) -> dict:
    """One benchmark set's block of ``summary.json``: per-seed bucket metrics of every recipe and the
    paired comparisons of the ``COMPARED`` recipes against each other recipe (README "Results")."""
    methods = list(dict.fromkeys(long["method"]))
    block: dict = {"steps": steps, "seeds": seeds, "batch_size": batch_size, "n_eval_captions": n_eval_captions,
                   "overrides": overrides, **protocol, "methods": {}, "comparisons": {}}
    for method in methods:
        rows = long[long["method"] == method]
        block["methods"][method] = {
            name: [_clean(_bucket_value(rows, seed, bucket, col)) for seed in seeds]
            for name, (bucket, col) in SUMMARY_METRICS.items()
        }
    for a in COMPARED:
        if a in methods:
            for other in methods:
                if other != a and not (a != COMPARED[0] and other in COMPARED):
                    block["comparisons"][f"{a}_vs_{other}"] = _compare(block["methods"], classes, a, other)
    return block


def _compare(per_method: dict, classes: pd.DataFrame, a: str, b: str) -> dict:
    """Paired comparison of recipe ``a`` against ``b`` per bucket: per-seed accuracy ratios, the
    ratio of class means with its bootstrap interval over classes (and its relative half-width),
    and the difference in copy rate."""
    from pogdiff import metrics

    out = {}
    for bucket in ("few", "medium", "many"):
        va, vb = (_nan(per_method[m][f"{bucket}_acc"]) for m in (a, b))
        both = [i for i, (x, y) in enumerate(zip(va, vb)) if np.isfinite(x) and np.isfinite(y)]
        common = sorted(set(classes.loc[classes["method"] == a, "seed"]) & set(classes.loc[classes["method"] == b, "seed"]))
        va, vb = [va[i] for i in both], [vb[i] for i in both]
        ratios = metrics.paired_ratios(va, vb)
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
            ratio, low, high = metrics.bootstrap_ratio_ci(by_class[a].values, by_class[b].values)
            entry.update(ratio_of_means=_clean(ratio), bootstrap_ci95=[_clean(low), _clean(high)],
                         n_classes=int(len(by_class)))
            if np.isfinite(ratio) and ratio > 0 and np.isfinite(low) and np.isfinite(high):
                entry["ci_half_width_relative"] = _clean((high - low) / (2 * ratio))
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


def _add_generation_shifts(block: dict, generated: dict, subjects: list[str], counts: dict, *, seeds, steps: int) -> None:
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


def _merge_summary(path: Path, data: str, entry: dict) -> None:
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[data] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _quick_rows(eval_set) -> list[int]:
    """Two evaluation captions for each of the first three classes (test size)."""
    seen: dict[str, int] = {}
    rows = []
    for i, s in enumerate(eval_set.subjects):
        if seen.get(s, 0) < 2 and (s in seen or len(seen) < 3):
            seen[s] = seen.get(s, 0) + 1
            rows.append(i)
    return rows


def budget_figure(long: pd.DataFrame, *, path: Path, title: str = "") -> Path:
    """Accuracy per bucket (few, medium, many) against fine-tuning steps, one line per recipe,
    mean over seeds with the seeds' min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, bucket in zip(axes, ("few", "medium", "many")):
        part = long[(long["bucket"] == bucket) & long["accuracy"].notna()]
        ax.set_title(f"{title} {bucket}-shot".strip())
        ax.set_xlabel("fine-tuning steps")
        if part.empty:
            ax.text(0.5, 0.5, "no classes", ha="center", va="center", transform=ax.transAxes)
            continue
        for method, rows in part.groupby("method", sort=False):
            g = rows.groupby("steps")["accuracy"]
            x = g.mean().index.values
            ax.plot(x, g.mean().values, marker="o", label=method)
            ax.fill_between(x, g.min().values, g.max().values, alpha=0.15)
        ax.set_xscale("log")
        budgets = sorted(part["steps"].unique())
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("identity accuracy")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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


def _few_shot_grids(out: Path, eval_set, grids: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    from pogdiff.data.stats import shot_bucket
    from pogdiff.sampling import image_grid

    rows = [i for i, s in enumerate(eval_set.subjects) if shot_bucket(counts.get(s, 0)) == "few"]
    if not rows:
        return
    for method, images in grids.items():
        labels = [f"{eval_set.subjects[i]}" for i in rows]
        image_grid(images[rows], ncols=8, labels=labels, scale=2).save(out / f"few_shot_{method}.png")


def add_parsers(bench) -> None:
    """Register ``speed``, ``report`` and ``quality`` under ``python -m pogdiff bench`` (README
    "Options of the other commands")."""
    from pogdiff.cli import BATCH, STEPS, bounded
    from pogdiff.config import LIMITS

    p = bench.add_parser("speed", help="PoGDiff vs plain step time, cached vs re-encoded captions")
    p.add_argument("--steps", type=STEPS, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=bounded(int, 0, LIMITS.max_steps), default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=BATCH, default=32, help="batch size")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.set_defaults(fn=main)
    p = bench.add_parser("report", help="print the markdown tables of a quality summary.json")
    p.add_argument("--summary", default="results/quality/summary.json", help="summary.json of bench quality")
    p.set_defaults(fn=main)
    p = bench.add_parser("quality", help="baseline / pogdiff / cbdm / resample on an embedded set, paired over seeds")
    p.add_argument("--out", default="results/quality",
                   help="output folder: <out>/<data>/ (runs, tables, plots, grids) and <out>/summary.json")
    p.add_argument("--data", choices=tuple(DATASETS), default="demo", help="embedded benchmark set")
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   help="recipes to compare (README \"Results\")")
    p.add_argument("--batch-size", type=int, default=QUALITY_BATCH, help="fine-tuning batch size")
    p.add_argument("--eval-per-class", type=int, default=QUALITY_EVAL_PER_CLASS,
                   help="evaluation captions per class (at most 8)")
    p.add_argument("--sample-seeds", type=int, default=QUALITY_SAMPLE_SEEDS, help="sampling seeds per evaluation caption")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=None, help="the budget summary.json reports (default: the chosen one)")
    p.add_argument("--budgets", type=int, nargs="+", default=list(QUALITY_BUDGETS),
                   help="fine-tuning budgets read from each run (budget.json)")
    p.add_argument("--seeds-for", nargs="+", default=[], metavar="RECIPE=SEEDS",
                   help="fewer seeds for some recipes, e.g. cbdm=0 (comparisons pair the seeds both have)")
    p.add_argument("--quick", action="store_true", help="tiny size for tests")
    p.add_argument("--ship", default=None,
                   help="copy each recipe's seed-0 checkpoint at --steps to this folder (demo-<recipe>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig/PsiConfig field for every run, e.g. psi.psi_max=2")
    p.set_defaults(fn=main)


def main(args) -> int:
    """``bench speed | report | quality``: print the tables (and write ``--out``)."""
    if args.bench_cmd == "report":
        print(summary_markdown(json.loads(Path(args.summary).read_text())))
        budget = Path(args.summary).with_name("budget.json")
        if budget.is_file():
            print(budget_markdown(json.loads(budget.read_text())))
        return 0
    if args.bench_cmd == "speed":
        table = speed(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, repeats=args.repeats)
        print(table.to_string(index=False))
        if args.out:
            Path(args.out).write_text(table.to_json(orient="records", indent=2))
        return 0
    report = quality(out=Path(args.out), methods=args.methods, seeds=args.seeds, steps=args.steps,
                     budgets=args.budgets, quick=args.quick, overrides=args.set,
                     ship=Path(args.ship) if args.ship else None, data=args.data, batch_size=args.batch_size,
                     eval_per_class=args.eval_per_class, sample_seeds=args.sample_seeds,
                     seeds_for=_seeds_for(args.seeds_for))
    print(to_markdown(report, steps=args.steps or QUALITY_STEPS, seeds=args.seeds))
    return 0



def _seeds_for(items: list[str] | None) -> dict[str, list[int]]:
    """``["resample=0", "cbdm=0,1"]`` -> ``{"resample": [0], "cbdm": [0, 1]}``."""
    out = {}
    for item in items or []:
        name, _, raw = item.partition("=")
        try:
            out[name] = [int(x) for x in raw.split(",") if x]
        except ValueError:
            raise ValueError(f"--seeds-for {item!r}: write RECIPE=SEED[,SEED...], e.g. cbdm=0") from None
        if not out[name]:
            raise ValueError(f"--seeds-for {item!r}: write RECIPE=SEED[,SEED...], e.g. cbdm=0")
    return out


# ---------------------------------------------------------------------------------- report
TARGET_FEW_RATIO = 1.5  # the fidelity target: PoGDiff few-shot accuracy >= 1.5x plain fine-tuning


def _mean_std(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


METHOD_COLUMNS = (("few-shot acc", "few_acc"), ("medium acc", "medium_acc"), ("many-shot acc", "many_acc"),
                  ("few copy", "few_copy"), ("few proximity", "few_proximity"), ("few coverage", "few_coverage"),
                  ("few gRecall", "few_grecall"), ("FD all", "all_fd"))


def _methods_table(methods: dict) -> list[str]:
    lines = ["| recipe | " + " | ".join(h for h, _ in METHOD_COLUMNS) + " |",
             "|---|" + "---:|" * len(METHOD_COLUMNS)]
    for method, m in methods.items():
        lines.append(f"| {method} | " + " | ".join(_mean_std(m.get(k, [])) for _, k in METHOD_COLUMNS) + " |")
    return lines


def _comparisons_table(comps: dict) -> list[str]:
    lines = ["| comparison | bucket | paired ratio per seed | ratio of class means [95% bootstrap CI] | ± | "
             "every seed > 1 | copy difference | generation shift |", "|---|---|---|---|---:|---|---:|---:|"]
    for name, comp in comps.items():
        for bucket, c in comp.items():
            ratios = ", ".join("—" if r is None else f"{r:.2f}" for r in c["paired_ratio"])
            ci = c.get("bootstrap_ci95", [None, None])
            rom = c.get("ratio_of_means")
            interval = ("—" if rom is None else
                        f"{rom:.2f} [{'—' if ci[0] is None else f'{ci[0]:.2f}'}, "
                        f"{'—' if ci[1] is None else f'{ci[1]:.2f}'}]")
            half = c.get("ci_half_width_relative")
            copy, shift = c.get("copy_difference"), c.get("generation_shift")
            lines.append(f"| {name.replace('_vs_', ' vs ')} | {bucket} | {ratios} | {interval} | "
                         f"{'—' if half is None else f'{100 * half:.0f}%'} | "
                         f"{'yes' if c['every_seed_above_1'] else 'no'} | {'—' if copy is None else f'{copy:+.3f}'} | "
                         f"{'—' if shift is None else f'{shift:.3f}'} |")
    return lines


TARGET_MANY_POINTS = 0.02  # many-shot accuracy within 2 points of plain fine-tuning


def target_checks(block: dict, recipe: str = "pogdiff") -> list[dict]:
    """The default recipe's targets (README "Results") judged on one set's ``summary.json`` block:
    few-shot accuracy >= 1.5x plain and above resampling and CBDM (ratio of class means and its
    interval), copy rate below resampling's, many-shot accuracy within 2 points of plain, and the
    PoG term's own contribution (the paired ablation's interval excludes 1)."""
    methods, comps = block["methods"], block.get("comparisons", {})

    def mean(name: str, key: str) -> float | None:
        values = [v for v in methods.get(name, {}).get(key, []) if v is not None]
        return float(np.mean(values)) if values else None

    def ratio(other: str, bucket: str = "few") -> dict:
        return comps.get(f"{recipe}_vs_{other}", {}).get(bucket, {})

    checks = []
    r = ratio("baseline")
    checks.append({"target": "few-shot acc >= 1.5x plain", "value": r.get("ratio_of_means"),
                   "interval": r.get("bootstrap_ci95"),
                   "met": None if r.get("ratio_of_means") is None else r["ratio_of_means"] >= TARGET_FEW_RATIO})
    for other in ("resample", "cbdm"):
        r = ratio(other)
        ci = r.get("bootstrap_ci95") or [None, None]
        checks.append({"target": f"few-shot acc above {other}", "value": r.get("ratio_of_means"), "interval": ci,
                       "met": None if ci[0] is None else ci[0] > 1.0})
    a, b = mean(recipe, "few_copy"), mean("resample", "few_copy")
    checks.append({"target": "few-shot copy rate below resample's", "value": a, "interval": None, "reference": b,
                   "met": None if a is None or b is None else a < b})
    a, b = mean(recipe, "many_acc"), mean("baseline", "many_acc")
    checks.append({"target": "many-shot acc within 2 points of plain", "value": a, "interval": None, "reference": b,
                   "met": None if a is None or b is None else a >= b - TARGET_MANY_POINTS})
    r = comps.get(f"{recipe}_vs_{recipe}_no_pog", {}).get("few", {})
    ci = r.get("bootstrap_ci95") or [None, None]
    checks.append({"target": "PoG term's own effect (vs the same recipe without it): interval excludes 1",
                   "value": r.get("ratio_of_means"), "interval": ci,
                   "met": None if ci[0] is None else (ci[0] > 1.0 or ci[1] < 1.0)})
    return checks


def _checks_table(checks: list[dict]) -> list[str]:
    lines = ["| target | value | interval or reference | met? |", "|---|---:|---|---|"]
    for c in checks:
        value = "—" if c["value"] is None else f"{c['value']:.3f}"
        if c.get("interval") and None not in c["interval"]:
            extra = f"[{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]"
        elif c.get("reference") is not None:
            extra = f"reference {c['reference']:.3f}"
        else:
            extra = "—"
        met = "not measured" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['target']} | {value} | {extra} | {met} |")
    return lines


def summary_markdown(summary: dict) -> str:
    """Markdown tables of ``summary.json``: per set, each recipe's bucket metrics (mean ± sample
    std over seeds) and the paired comparisons (README "Results")."""
    lines = []
    for data, block in summary.items():
        lines += [f"### {data} ({block['steps']} steps, batch {block.get('batch_size', '?')}, seeds {block['seeds']}, "
                  f"{block.get('n_eval_captions', '?')} captions x {block.get('sample_seeds', 1)} sampling seeds)", ""]
        lines += _methods_table(block["methods"])
        if block.get("comparisons"):
            lines += [""] + _comparisons_table(block["comparisons"])
        if "pogdiff" in block["methods"]:
            lines += ["", "Targets of the default recipe (`pogdiff`):", ""] + _checks_table(target_checks(block))
        lines.append("")
    return "\n".join(lines)


def budget_markdown(curves: dict) -> str:
    """Markdown of ``budget.json``: per set, few / medium / many-shot accuracy and few-shot copy rate
    of every recipe at every budget (mean ± std over seeds)."""
    lines = []
    for data, curve in curves.items():
        budgets = curve["budgets"]
        lines += [f"### {data}: accuracy along the budget (seeds {curve['seeds']})", "",
                  "| recipe | bucket | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                  "|---|---|" + "---:|" * len(budgets)]
        methods = list(curve["by_budget"][str(budgets[0])]["methods"])
        for method in methods:
            for key in ("few_acc", "medium_acc", "many_acc", "few_copy"):
                cells = [_mean_std(curve["by_budget"][str(b)]["methods"].get(method, {}).get(key, [])) for b in budgets]
                lines.append(f"| {method} | {key} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
