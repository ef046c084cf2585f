"""Benchmarks and the commands that reproduce the shipped artefacts.

- ``bench speed``: PoGDiff step time relative to plain fine-tuning, measured in one run with the
  configurations interleaved (these machines are noisy, so ratios are what we report).
- ``bench quality``: baseline / PoGDiff / CBDM fine-tuned from the same base with the same steps,
  batch and seeds; generations for every evaluation caption with fixed seeds; metrics per class and
  per many / medium / few-shot bucket, mean +- std over training seeds.
- ``build base`` / ``build evaluator``: the shipped base checkpoint and evaluator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pogdiff import checkpoints
from pogdiff.constants import REPO_ROOT
from pogdiff.constants import SHIPPED_DIR as SHIPPED
from pogdiff.config import DataConfig, PsiConfig, SampleConfig, TrainConfig, model_preset, to_dict, uses_balanced_sampling
from pogdiff.training import Trainer, prepare_data, train

logger = logging.getLogger(__name__)

BASE_DIR = SHIPPED / "base-tiny"
EVALUATOR_DIR = SHIPPED / "evaluator"
# The embedded benchmark sets (README "Results"): the demo spec kind and the evaluator that names them.
DATASETS = {"demo": ("identities", EVALUATOR_DIR), "families": ("families", SHIPPED / "evaluator-families")}
EVAL_SAMPLE = SampleConfig(scheduler="ddim", steps=25, guidance_scale=3.0)
QUALITY_STEPS = 300
QUALITY_BATCH = 16
QUALITY_EVAL_PER_CLASS = 4  # evaluation captions per class (of the 8 held out)
QUICK_STEPS = 2
# Buckets and metrics copied per seed into summary.json (name -> (bucket, summary column)).
SUMMARY_METRICS = {
    "few_acc": ("few", "accuracy"), "medium_acc": ("medium", "accuracy"), "many_acc": ("many", "accuracy"),
    "all_acc": ("all", "accuracy"), "few_grecall": ("few", "gRecall"), "medium_grecall": ("medium", "gRecall"),
    "few_fd": ("few", "FD"), "medium_fd": ("medium", "FD"), "many_fd": ("many", "FD"), "all_fd": ("all", "FD"),
}


def _demo_splits(data: str = "demo"):
    from pogdiff.data import DemoSpec, ensure_demo, load_image_text_set

    if data not in DATASETS:
        raise ValueError(f"unknown benchmark set {data!r}; choose one of {', '.join(DATASETS)}")
    root = ensure_demo(DemoSpec(kind=DATASETS[data][0]))
    cfg = DataConfig()
    return root, load_image_text_set(root / "train", cfg), load_image_text_set(root / "eval", cfg)


def _base_or_fresh():
    from pogdiff import models

    if (BASE_DIR / "configs.json").exists():
        return checkpoints.load_model(BASE_DIR), str(BASE_DIR)
    logger.warning("no base checkpoint at %s; using a randomly initialised tiny UNet", BASE_DIR)
    return models.build_tiny(model_preset("tiny")), None


# ------------------------------------------------------------------------------------ speed
class _ReencodeTrainer(Trainer):
    """The naive loop: encodes the batch's captions with the text encoder at every step."""

    def caption_states(self, rows):
        emb = self.model.text_encoder.encode([self.data.captions[i] for i in rows.tolist()])
        return emb.tokens.clone(), emb.mask.clone()


def speed(*, steps: int = 20, warmup: int = 3, batch_size: int = 32, repeats: int = 3) -> pd.DataFrame:
    """Median seconds per step of each configuration, and the ratio to plain fine-tuning."""
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
        "baseline, captions re-encoded every step": (_ReencodeTrainer, dataclasses.replace(base_cfg, method="baseline")),
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
def _attr_targets(eval_set) -> dict[str, np.ndarray]:
    from pogdiff.data.identities import age_group

    extra = [s.extra for s in eval_set.samples]
    return {
        "smiling": np.array([int(bool(e["smiling"])) for e in extra]),
        "glasses": np.array([int(bool(e["glasses"])) for e in extra]),
        "age_group": np.array([age_group(int(e["age"])) for e in extra]),
    }


def evaluate_model(model, eval_set, evaluator, train_counts: dict[str, int], *, sample_cfg: SampleConfig = EVAL_SAMPLE):
    """Generate one image per evaluation caption (seed = row index) and score it.

    :returns: (per-class table, bucket summary, generated images uint8 [N x H x W x 3]).
    """
    from pogdiff import metrics
    from pogdiff.sampling import generate

    captions = list(eval_set.captions)
    images = generate(model, captions, list(range(len(captions))), sample_cfg)
    pred = evaluator.predict(images)
    real_feats = evaluator.features(eval_set.images)
    table = metrics.per_class_table(
        subjects_gen=eval_set.subjects, pred_gen=pred["subject"], gen_feats=pred["features"],
        real_subjects=eval_set.subjects, real_feats=real_feats, train_counts=train_counts,
        attr_pred=pred["attrs"], attr_target=_attr_targets(eval_set),
    )
    summary = metrics.summarise(
        table, gen_feats_all=pred["features"], real_feats_all=real_feats,
        gen_subjects_all=eval_set.subjects, real_subjects_all=eval_set.subjects,
    ).reset_index()
    return table, summary, images


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


def quality(*, out: Path, methods, seeds, steps: int | None = None, quick: bool = False,
            overrides: list[str] | None = None, ship: Path | None = None, data: str = "demo",
            batch_size: int = QUALITY_BATCH, eval_per_class: int = QUALITY_EVAL_PER_CLASS) -> pd.DataFrame:
    """Fine-tune each method from the same base for each seed, evaluate, and write the report.

    Runs are paired: every method sees the same seeds, hence the same timesteps, noise and (except
    ``resample``) batch rows, and generates from the same captions with the same sampling seeds.
    Writes ``out/<data>/`` (runs, tables, plots, grids) and merges ``out/summary.json``.
    """
    from pogdiff import metrics
    from pogdiff.evaluator import load_evaluator

    out = Path(out)
    folder = out / data
    folder.mkdir(parents=True, exist_ok=True)
    _, train_set, eval_set = _demo_splits(data)
    eval_set = _subset(eval_set, _quick_rows(eval_set) if quick else _per_class_rows(eval_set, eval_per_class))
    evaluator = load_evaluator(DATASETS[data][1])
    _, base = _base_or_fresh()
    model_cfg = checkpoints.load_configs(base)[0] if base else model_preset("tiny")
    counts = pd.Series(train_set.subjects).value_counts().to_dict()
    steps = steps or (QUICK_STEPS if quick else QUALITY_STEPS)
    sample_cfg = dataclasses.replace(EVAL_SAMPLE, steps=2) if quick else EVAL_SAMPLE
    summaries, tables, grids, per_class = [], {}, {}, []
    for seed in seeds:
        for method in methods:
            cfg = TrainConfig(method=method, max_steps=steps, seed=seed, batch_size=batch_size,
                              checkpoint_every=0, log_every=50)
            cfg = _apply_overrides(cfg, overrides or [])
            run_dir = folder / "runs" / f"{method}-seed{seed}"
            table, summary, images = _evaluated_run(run_dir, cfg, train_set, eval_set, evaluator, counts,
                                                    model_cfg=model_cfg, base=base, sample_cfg=sample_cfg)
            summaries.append(summary.assign(method=method, seed=seed))
            per_class.append(table.assign(method=method, seed=seed))
            if seed == seeds[0]:
                tables[method] = table
                grids[method] = images
    long = pd.concat(summaries, ignore_index=True)
    long.to_csv(folder / "summary_all_seeds.csv", index=False)
    classes = pd.concat(per_class, ignore_index=True)
    classes.to_csv(folder / "per_class_all_seeds.csv", index=False)
    report = aggregate(long)
    report.to_csv(folder / "results.csv", index=False)
    (folder / "results.json").write_text(report.to_json(orient="records", indent=2))
    (folder / "results.md").write_text(to_markdown(report, steps=steps, seeds=seeds))
    metrics.accuracy_vs_frequency_figure(tables, path=folder / "accuracy_vs_frequency.png")
    _few_shot_grids(folder, eval_set, grids, counts)
    entry = summary_entry(long, classes, steps=steps, seeds=list(seeds), batch_size=batch_size,
                          n_eval=len(eval_set), overrides=overrides or [])
    _merge_summary(out / "summary.json", data, entry)
    if ship:
        _ship_demo_runs(folder, Path(ship), seeds[0], tables, prefix="demo" if data == "demo" else data)
    return report


def summary_entry(long: pd.DataFrame, classes: pd.DataFrame, *, steps: int, seeds: list[int], batch_size: int,
                  n_eval: int, overrides: list[str]) -> dict:
    """One benchmark set's block of ``summary.json``: per-seed bucket metrics of every method and
    the paired comparisons of PoGDiff against each other method (README "Results")."""
    methods = list(dict.fromkeys(long["method"]))
    block: dict = {"steps": steps, "seeds": seeds, "batch_size": batch_size, "n_eval_captions": n_eval,
                   "overrides": overrides, "methods": {}, "comparisons": {}}
    for method in methods:
        rows = long[long["method"] == method]
        block["methods"][method] = {
            name: [_clean(_bucket_value(rows, seed, bucket, col)) for seed in seeds]
            for name, (bucket, col) in SUMMARY_METRICS.items()
        }
    if "pogdiff" in methods:
        for other in methods:
            if other != "pogdiff":
                block["comparisons"][f"pogdiff_vs_{other}"] = _compare(block["methods"], classes, "pogdiff", other)
    return block


def _compare(per_method: dict, classes: pd.DataFrame, a: str, b: str) -> dict:
    from pogdiff import metrics

    out = {}
    for bucket in ("few", "medium", "many"):
        key = f"{bucket}_acc"
        va, vb = (_nan(per_method[m][key]) for m in (a, b))
        ratios = metrics.paired_ratios(va, vb)
        part = classes[classes["shot"] == bucket]
        by_class = part.groupby(["method", "subject"])["accuracy"].mean().unstack(0)
        entry = {"paired_ratio": [_clean(r) for r in ratios],
                 "every_seed_above_1": bool(all(r > 1 for r in ratios)),
                 "mean_difference": _clean(float(np.mean(va) - np.mean(vb)))}
        if a in by_class and b in by_class and len(by_class):
            ratio, low, high = metrics.bootstrap_ratio_ci(by_class[a].values, by_class[b].values)
            entry.update(ratio_of_means=_clean(ratio), bootstrap_ci95=[_clean(low), _clean(high)],
                         n_classes=int(len(by_class)))
        out[bucket] = entry
    return out


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


# Metric modes of the Compare tab (README "What you see"): "fast" is the quality benchmark's protocol
# (the first QUALITY_EVAL_PER_CLASS held-out captions of every class), so the numbers shipped with
# the demo checkpoints come out again; "full" uses every held-out caption.
METRIC_MODES = {"fast": QUALITY_EVAL_PER_CLASS, "full": None}


def metric_eval_set(eval_set, mode: str):
    """The evaluation captions of a metric mode (see ``METRIC_MODES``)."""
    if mode not in METRIC_MODES:
        raise ValueError(f"unknown metric mode {mode!r}; choose one of {', '.join(METRIC_MODES)}")
    per_class = METRIC_MODES[mode]
    return eval_set if per_class is None else _subset(eval_set, _per_class_rows(eval_set, per_class))


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


def _per_class_rows(eval_set, n: int) -> list[int]:
    """The first ``n`` evaluation captions of every class, in file order."""
    seen: dict[str, int] = {}
    rows = []
    for i, s in enumerate(eval_set.subjects):
        if seen.get(s, 0) < n:
            seen[s] = seen.get(s, 0) + 1
            rows.append(i)
    return rows


def _evaluated_run(run_dir: Path, cfg: TrainConfig, train_set, eval_set, evaluator, counts, *, model_cfg, base,
                   sample_cfg: SampleConfig):
    """Train (or resume) one run and evaluate it; a finished, evaluated run is read back from disk.

    The cache (``summary.csv``, ``per_class.csv``, ``generated.npy``) is keyed by the run's train
    config and the evaluation captions, so changing either recomputes it.
    """
    key = json.dumps({"train": _train_key(cfg), "captions": list(eval_set.captions), "sample": to_dict(sample_cfg)},
                     sort_keys=True)
    stamp = run_dir / "evaluated.json"
    if stamp.exists() and stamp.read_text() == key:
        logger.info("%s: using the stored evaluation", run_dir.name)
        return (pd.read_csv(run_dir / "per_class.csv"), pd.read_csv(run_dir / "summary.csv"),
                np.load(run_dir / "generated.npy", allow_pickle=False))
    t0 = time.perf_counter()
    result = train(dataset=train_set, model_cfg=model_cfg, train_cfg=cfg, run_dir=run_dir,
                   base_checkpoint=base, resume=True)
    train_s = time.perf_counter() - t0
    model = checkpoints.load_model(result.last_checkpoint)
    table, summary, images = evaluate_model(model, eval_set, evaluator, counts, sample_cfg=sample_cfg)
    summary = summary.assign(train_seconds=round(train_s, 1))
    table.to_csv(run_dir / "per_class.csv", index=False)
    summary.to_csv(run_dir / "summary.csv", index=False)
    np.save(run_dir / "generated.npy", images, allow_pickle=False)
    stamp.write_text(key)
    logger.info("%s done: trained in %.0fs", run_dir.name, train_s)
    return table, summary, images


def _train_key(cfg: TrainConfig) -> dict:
    """The parts of a TrainConfig a run depends on (psi options only matter to PoGDiff)."""
    key = to_dict(cfg)
    # The resolved setting, so an explicit flag and a method default that agree share a cache.
    # "resample" is balanced whatever the flag says; its key keeps False, the value it always had.
    key["balanced_sampling"] = uses_balanced_sampling(cfg) if cfg.method != "resample" else False
    if cfg.method != "pogdiff":
        key.pop("psi")
    return key


def _quick_rows(eval_set) -> list[int]:
    """Two evaluation captions for each of the first three classes (test size)."""
    seen: dict[str, int] = {}
    rows = []
    for i, s in enumerate(eval_set.subjects):
        if seen.get(s, 0) < 2 and (s in seen or len(seen) < 3):
            seen[s] = seen.get(s, 0) + 1
            rows.append(i)
    return rows


def _subset(ds, rows):
    return dataclasses.replace(ds, samples=[ds.samples[i] for i in rows], images=ds.images[rows])


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


def _ship_demo_runs(out: Path, ship: Path, seed: int, tables: dict[str, pd.DataFrame], *,
                    prefix: str = "demo") -> None:
    """Copy the seed's checkpoints of every method where the app finds them (``<prefix>-<method>``)."""
    for method in tables:
        src = checkpoints.latest_checkpoint(out / "runs" / f"{method}-seed{seed}")
        if src is None:
            continue
        dst = ship / f"{prefix}-{method}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        checkpoints.store_half_precision(dst)
        if method in tables:
            tables[method].to_csv(dst / "per_class.csv", index=False)


# ------------------------------------------------------------------------------- artefacts
def build_base(*, out: Path, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    """Pretrain the tiny base UNet on the balanced, disjoint pretraining identities."""
    from pogdiff.data import ensure_demo, load_image_text_set

    pre = load_image_text_set(ensure_demo() / "pretrain", DataConfig())
    cfg = TrainConfig(method="baseline", max_steps=steps, batch_size=batch_size, learning_rate=lr, seed=seed,
                      warmup_steps=100, checkpoint_every=500, log_every=100)
    run_dir = REPO_ROOT / "runs" / f"build-{Path(out).name}"
    result = train(dataset=pre, model_cfg=model_preset("tiny"), train_cfg=cfg, run_dir=run_dir)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(result.last_checkpoint, out)
    checkpoints.store_half_precision(out)
    base_samples(out, pre)
    return out


def base_samples(out: Path, pre) -> Path:
    """A grid of the base model's samples for 8 pretraining identities (4 seeds each), with the
    real pretraining images of the same identities beside it for comparison."""
    from pogdiff.sampling import generate, image_grid

    model = checkpoints.load_model(out)
    subjects = sorted(set(pre.subjects))[:8]
    captions = [next(c for c, s in zip(pre.captions, pre.subjects) if s == subj) for subj in subjects]
    prompts = [c for c in captions for _ in range(4)]
    images = generate(model, prompts, [i % 4 for i in range(len(prompts))], EVAL_SAMPLE)
    real = [pre.images[[i for i, s in enumerate(pre.subjects) if s == subj][:2]] for subj in subjects]
    rows = [np.concatenate([images[4 * k: 4 * k + 4], real[k]]) for k in range(len(subjects))]
    labels = [f"{subj} (seed {j})" if j < 4 else f"{subj} (real)" for subj in subjects for j in range(6)]
    image_grid(np.concatenate(rows), ncols=6, labels=labels, scale=3).save(Path(out) / "samples.png")
    (Path(out) / "samples.json").write_text(json.dumps({"prompts": captions, "seeds": [0, 1, 2, 3]}, indent=2))
    return Path(out) / "samples.png"


def build(args) -> int:
    if args.build_cmd == "base":
        out = build_base(out=Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"base checkpoint written to {out}")
        return 0
    from pogdiff.data.demo import DemoSpec
    from pogdiff.evaluator import EvaluatorConfig, train_evaluator

    cfg = EvaluatorConfig(seed=args.seed)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    res = train_evaluator(DemoSpec(kind=args.kind), cfg, Path(args.out))
    print(json.dumps(res, indent=2, default=str))
    return 0


def main(args) -> int:
    if args.bench_cmd == "report":
        print(summary_markdown(json.loads(Path(args.summary).read_text())))
        return 0
    if args.bench_cmd == "speed":
        table = speed(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, repeats=args.repeats)
        print(table.to_string(index=False))
        if args.out:
            Path(args.out).write_text(table.to_json(orient="records", indent=2))
        return 0
    report = quality(out=Path(args.out), methods=args.methods, seeds=args.seeds, steps=args.steps,
                     quick=args.quick, overrides=args.set, ship=Path(args.ship) if args.ship else None,
                     data=args.data, batch_size=args.batch_size, eval_per_class=args.eval_per_class)
    print(to_markdown(report, steps=args.steps or QUALITY_STEPS, seeds=args.seeds))
    return 0



# ---------------------------------------------------------------------------------- report
TARGET_FEW_RATIO = 1.5  # the fidelity target: PoGDiff few-shot accuracy >= 1.5x plain fine-tuning


def _mean_std(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def summary_markdown(summary: dict) -> str:
    """Markdown tables of ``summary.json``: per set, each method's bucket metrics (mean ± sample
    std over seeds) and PoGDiff's paired comparisons with the targets of README "Results"."""
    lines = []
    for data, block in summary.items():
        lines += [f"### {data} ({block['steps']} steps, batch {block.get('batch_size', '?')}, seeds {block['seeds']})", "",
                  "| method | few-shot acc | few-shot gRecall | medium acc | many-shot acc | FD few | FD all |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for method, m in block["methods"].items():
            cells = [_mean_std(m.get(k, [])) for k in ("few_acc", "few_grecall", "medium_acc", "many_acc", "few_fd", "all_fd")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        comps = block.get("comparisons", {})
        if comps:
            lines += ["", "| PoGDiff vs | bucket | paired ratio per seed | ratio of class means [95% bootstrap CI] | every seed > 1 |",
                      "|---|---|---|---|---|"]
            for name, comp in comps.items():
                for bucket, c in comp.items():
                    ratios = ", ".join("—" if r is None else f"{r:.2f}" for r in c["paired_ratio"])
                    ci = c.get("bootstrap_ci95", [None, None])
                    rom = c.get("ratio_of_means")
                    interval = ("—" if rom is None else
                                f"{rom:.2f} [{'—' if ci[0] is None else f'{ci[0]:.2f}'}, "
                                f"{'—' if ci[1] is None else f'{ci[1]:.2f}'}]")
                    lines.append(f"| {name.removeprefix('pogdiff_vs_')} | {bucket} | {ratios} | {interval} | "
                                 f"{'yes' if c['every_seed_above_1'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)
