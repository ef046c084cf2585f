"""The speed and quality benchmarks and their report (BENCHMARKS.md "Speed" and "Quality").

- ``bench speed``: PoGDiff step time relative to plain fine-tuning, measured in one run with the
  configurations interleaved (these machines are noisy, so ratios are what we report).
- ``bench quality``: baseline / PoGDiff / CBDM fine-tuned from the same base with the same steps,
  batch and seeds; generations for every evaluation caption with fixed seeds; metrics per class and
  per many / medium / few-shot bucket, mean +- std over training seeds (the protocol is
  :mod:`pogdiff.evaluation.protocol`'s); ``results/quality/summary.json`` and ``budget.json``.
- ``bench report``: the markdown tables of a ``summary.json`` and the targets of the default recipe
  (:mod:`pogdiff.bench.report`; the summary blocks are :mod:`pogdiff.bench.summary`'s).

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

from pogdiff.constants import DEFAULT_BASE, REPO_ROOT
from pogdiff.constants import SHIPPED_DIR as SHIPPED
from pogdiff.evaluation.protocol import EVAL_SAMPLE, evaluate_model, per_class_rows, subset
from pogdiff.bench.report import budget_figure, budget_markdown, few_shot_grids, summary_markdown
from pogdiff.bench.summary import add_generation_shifts, merge_summary, aggregate, summary_entry, to_markdown
from pogdiff.config import (
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

EVALUATOR_DIR = SHIPPED / "evaluator"
# The embedded benchmark sets (README "Results"): the demo spec kind and the evaluator that names them.
DATASETS = {"demo": ("identities", EVALUATOR_DIR), "families": ("families", SHIPPED / "evaluator-families")}
QUALITY_STEPS = 1000  # the budget summary.json reports: chosen from the budget curve (README "Results")
QUALITY_BUDGETS = (300, 1000)  # the budget curve's points (budget.json)
QUALITY_BATCH = 16
QUALITY_EVAL_PER_CLASS = 8  # held-out captions per class (all of them)
QUALITY_SAMPLE_SEEDS = 2  # sampling seeds per caption
# The benchmark's sampler: the Compare tab's, with the UNet under bfloat16 autocast (BENCHMARKS
# "Sampling": same accuracy, about twice as fast on this CPU).
BENCH_SAMPLE = dataclasses.replace(EVAL_SAMPLE, precision="bf16")
QUICK_STEPS = 2
SPEED_SHARE = 0.25  # bench speed's capped configuration: psi.neighbour_share


EVAL_SPLITS = ("eval", "val")  # the evaluation split reported, the validation split that chooses knobs


def _demo_splits(data: str = "demo", split: str = "eval"):
    from pogdiff.data import DemoSpec, ensure_demo, load_image_text_set
    from pogdiff.data.demo import ensure_validation_split

    if data not in DATASETS:
        raise ValueError(f"unknown benchmark set {data!r}; choose one of {', '.join(DATASETS)}")
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(EVAL_SPLITS)}")
    spec = DemoSpec(kind=DATASETS[data][0])
    root = ensure_demo(spec)
    if split == "val":
        ensure_validation_split(root, spec)
    cfg = DataConfig()
    return root, load_image_text_set(root / "train", cfg), load_image_text_set(root / split, cfg)


def eval_subjects(data: str = "demo", eval_per_class: int = QUALITY_EVAL_PER_CLASS) -> list[str]:
    """The subject of each evaluation caption of a benchmark set, in the order they are generated."""
    _, _, eval_set = _demo_splits(data)
    return list(subset(eval_set, per_class_rows(eval_set, eval_per_class)).subjects)


def _base_or_fresh():
    from pogdiff.model import checkpoints
    from pogdiff.model import models

    if (DEFAULT_BASE / "configs.json").exists():
        return checkpoints.load_model(DEFAULT_BASE), str(DEFAULT_BASE)
    logger.warning("no base checkpoint at %s; using a randomly initialised tiny UNet", DEFAULT_BASE)
    return models.build_tiny(model_preset("tiny")), None


# ------------------------------------------------------------------------------------ speed
def _reencoding_trainer():
    """The naive loop: a :class:`pogdiff.training.run.Trainer` that encodes the batch's captions with
    the text encoder at every step."""
    from pogdiff.training.trainer import Trainer

    class ReencodeTrainer(Trainer):
        def caption_states(self, rows):
            emb = self.model.text_encoder.encode([self.data.captions[i] for i in rows.tolist()])
            return emb.tokens.clone(), emb.mask.clone()

    return ReencodeTrainer


def speed(*, steps: int = 20, warmup: int = 3, batch_size: int = 32, repeats: int = 3) -> pd.DataFrame:
    """Median seconds per step of each configuration, and the ratio to plain fine-tuning."""
    from pogdiff.training.trainer import Trainer
    from pogdiff.method.prepare import prepare_data

    _, train_set, _ = _demo_splits()
    model, _ = _base_or_fresh()
    data = prepare_data(train_set, model, PsiConfig())
    base_cfg = TrainConfig(batch_size=batch_size, max_steps=10**9, checkpoint_every=0, log_every=0)
    configs = {
        "baseline (plain loss)": (Trainer, dataclasses.replace(base_cfg, method="baseline")),
        "pogdiff (neighbour pass only where psi > threshold)": (Trainer, dataclasses.replace(base_cfg, method="pogdiff")),
        "pogdiff, neighbour pass for the quarter of rows it moves most": (
            Trainer, dataclasses.replace(base_cfg, method="pogdiff", psi=PsiConfig(neighbour_share=SPEED_SHARE))),
        "pogdiff naive (neighbour pass for every row)": (
            Trainer, dataclasses.replace(base_cfg, method="pogdiff", psi=PsiConfig(psi_threshold=-1.0))),
        "t2h (target transfer, no extra pass)": (Trainer, dataclasses.replace(base_cfg, method="t2h")),
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
                _, stats = trainer.run_step()
                trainer.step += 1
                active[name].append(stats.get("psi_active", 0.0))
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
    (docs/ARCHITECTURE.md "Shapes and conventions"), so the budgets' checkpoints are those of one run
    read along the way. A run folder that holds another configuration is refused rather than mixed in.

    :returns: ``{budget: checkpoint folder}``.
    """
    from pogdiff.model import checkpoints
    from pogdiff.training.run import train

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
    """Evaluate one checkpoint (:func:`pogdiff.evaluation.protocol.evaluate_model`), cached beside it in
    ``eval-<step>/`` and keyed by its weights, the captions, the sampler and the sampling seeds."""
    from pogdiff.model import checkpoints
    from pogdiff.evaluation.protocol import checkpoint_digest

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
            sample_seeds: int = QUALITY_SAMPLE_SEEDS, seeds_for: dict[str, list[int]] | None = None,
            split: str = "eval") -> pd.DataFrame:
    """Fine-tune each recipe from the same base for each seed, read every budget, evaluate, report.

    ``seeds_for`` gives some recipes fewer seeds than ``seeds`` (a subset of them); comparisons
    then pair the seeds both recipes have.

    Runs are paired: every recipe sees the same seeds, hence the same timesteps, noise and (except
    where batches are class-balanced) batch rows, and generates from the same captions with the
    same sampling seeds. Each (recipe, seed) is one run, read at every budget of ``budgets``.
    ``split="val"`` scores the validation split instead of the evaluation split (choosing a knob,
    :mod:`pogdiff.bench.tune`).
    Writes ``out/<data>/`` (tables, plots, grids; runs under ``runs/``), merges the ``steps``
    budget into ``out/summary.json`` and every budget into ``out/budget.json``.
    """
    from pogdiff.model import checkpoints
    from pogdiff.evaluation import metrics
    from pogdiff.evaluation.demo_classifier import load_evaluator

    out = Path(out)
    folder = out / data
    folder.mkdir(parents=True, exist_ok=True)
    _, train_set, eval_set = _demo_splits(data, split)
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
    few_shot_grids(folder, eval_set, grids, counts)
    protocol = {"batch_size": batch_size, "n_eval_captions": len(eval_set), "sample_seeds": sample_seeds, "split": split,
                "sampler": to_dict(sample_cfg), "overrides": overrides or [],
                "recipes": {m: RECIPES[m] for m in methods}, "seeds_for": seeds_for}
    entry = summary_entry(at, classes_all[classes_all["steps"] == steps], steps=steps, seeds=list(seeds), **protocol)
    entry["budgets"] = budgets
    add_generation_shifts(entry, generated, subjects, counts, seeds=seeds, steps=steps)
    merge_summary(out / "summary.json", data, entry)
    curve = {"budgets": budgets, "seeds": list(seeds), **protocol, "by_budget": {}}
    for budget in budgets:
        part = long_all[long_all["steps"] == budget].drop(columns="steps")
        block = summary_entry(part, classes_all[classes_all["steps"] == budget], steps=budget, seeds=list(seeds),
                              **protocol)
        add_generation_shifts(block, generated, subjects, counts, seeds=seeds, steps=budget)
        curve["by_budget"][str(budget)] = block
    merge_summary(out / "budget.json", data, curve)
    budget_figure(long_all, path=folder / "budget.png", title=data)
    if ship:
        from pogdiff.bench.ship import ship_demo_runs

        ship_demo_runs(folder, Path(ship), seeds[0], tables, steps=steps, prefix="demo" if data == "demo" else data)
    return report


def _quick_rows(eval_set) -> list[int]:
    """Two evaluation captions for each of the first three classes (test size)."""
    seen: dict[str, int] = {}
    rows = []
    for i, s in enumerate(eval_set.subjects):
        if seen.get(s, 0) < 2 and (s in seen or len(seen) < 3):
            seen[s] = seen.get(s, 0) + 1
            rows.append(i)
    return rows


def add_parsers(bench) -> None:
    """Register ``speed``, ``report`` and ``quality`` under ``python -m pogdiff bench`` (README
    "Options of the other commands")."""
    from pogdiff.config import LIMITS
    from pogdiff.server.safety import bounded

    STEPS, BATCH = bounded(int, 1, LIMITS.max_steps), bounded(int, 1, LIMITS.max_batch_size)

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


