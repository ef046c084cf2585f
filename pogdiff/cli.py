"""Command line: ``python -m pogdiff <command> ...``; ``--help`` on every command lists its options.

Heavy modules are imported inside the handlers so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from pogdiff.config import METHODS, PRESETS, DataConfig, SampleConfig, model_preset, train_preset

logger = logging.getLogger("pogdiff")

DEMO = "demo"
DEFAULT_BASE = Path(__file__).resolve().parent.parent / "checkpoints" / "base-tiny"


def resolve_data(source: str, split: str = "train", *, resolution: int = 32):
    """Load an image-text set: a folder, a .zip, or ``demo`` for the embedded demo set."""
    from pogdiff.data import ensure_demo, load_image_text_set

    cfg = DataConfig(resolution=resolution)
    if source == DEMO:
        return load_image_text_set(ensure_demo() / split, cfg)
    return load_image_text_set(source, cfg)


# ------------------------------------------------------------------------------------- data
def cmd_data_demo(args) -> int:
    from pogdiff.data.demo import DemoSpec, build_demo

    out = build_demo(Path(args.out), DemoSpec(seed=args.seed, resolution=args.resolution))
    print(f"demo set written to {out} (contact sheet: {out / 'contact_sheet.png'})")
    return 0


def cmd_data_stats(args) -> int:
    from pogdiff.data import stats

    ds = resolve_data(args.source)
    if ds.report.issues:
        print(ds.report.to_markdown())
    table = stats.class_table(ds)
    print(json.dumps(stats.summary(ds), indent=2))
    print(table.to_string(index=False))
    if args.plot:
        stats.long_tail_figure(table, path=args.plot)
        print(f"long-tail chart written to {args.plot}")
    return 0


# ------------------------------------------------------------------------------------ train
def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DEMO, help="folder or .zip of images + captions, or 'demo' (default)")
    p.add_argument("--method", choices=METHODS, default="pogdiff", help="fine-tuning objective")
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="model preset")
    p.add_argument("--pretrained", default=None, help="sd15: hub id or local diffusers pipeline folder")
    p.add_argument("--base", default=None,
                   help="base checkpoint to fine-tune (tiny default: checkpoints/base-tiny; 'none' = random init)")
    p.add_argument("--run-dir", required=True, help="where checkpoints are written (resumes if present)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=None, help="batch size")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, noise and neighbours")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="autocast dtype")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (0 disables)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--psi-max", type=float, default=None, help="PoGDiff: maximum neighbour precision psi")
    p.add_argument("--k", type=int, default=None, help="PoGDiff: neighbours per caption")
    p.add_argument("--no-density", action="store_true", help="PoGDiff: drop the density factor of psi")
    p.add_argument("--no-image-sim", action="store_true", help="PoGDiff: drop the image-similarity factor")
    p.add_argument("--no-text-sim", action="store_true", help="PoGDiff: drop the text-similarity factor")
    p.add_argument("--same-class", action=argparse.BooleanOptionalAction, default=None,
                   help="PoGDiff: neighbours only from the caption's own class (default: on; --no-same-class: any caption)")
    p.add_argument("--neighbour-sampling", choices=("similarity", "nearest"), default=None,
                   help="PoGDiff: draw one of k neighbours by similarity, or always the nearest")
    p.add_argument("--cbdm-tau", type=float, default=None, help="CBDM regulariser weight")
    p.add_argument("--no-resume", action="store_true", help="start over even if run-dir has checkpoints")
    p.add_argument("--cache-dir", default=None,
                   help="where caption embeddings and VAE latents are cached (default: $POGDIFF_CACHE or ~/.cache/pogdiff)")


def configs_from_args(args):
    overrides = {
        "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
        "mixed_precision": args.mixed_precision, "ema_decay": args.ema_decay,
        "checkpoint_every": args.checkpoint_every, "cbdm_tau": args.cbdm_tau,
    }
    train_cfg = train_preset(args.preset, method=args.method, seed=args.seed,
                             **{k: v for k, v in overrides.items() if v is not None})
    psi = train_cfg.psi
    psi_over = {"psi_max": args.psi_max, "k": args.k, "sampling": args.neighbour_sampling,
                "same_class_pool": args.same_class}
    psi = dataclasses.replace(
        psi, **{k: v for k, v in psi_over.items() if v is not None},
        use_density=not args.no_density, use_image_sim=not args.no_image_sim,
        use_text_sim=not args.no_text_sim,
    )
    train_cfg = dataclasses.replace(train_cfg, psi=psi)
    model_over = {"pretrained": args.pretrained} if args.pretrained else {}
    return model_preset(args.preset, **model_over), train_cfg


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("POGDIFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "pogdiff") / "embeddings"


def default_base(preset: str, base: str | None) -> str | None:
    if base == "none":
        return None
    if base:
        return base
    return str(DEFAULT_BASE) if preset == "tiny" and DEFAULT_BASE.exists() else None


def cmd_train(args) -> int:
    from tqdm import tqdm

    from pogdiff.training import train

    model_cfg, train_cfg = configs_from_args(args)
    ds = resolve_data(args.data, resolution=model_cfg.resolution)
    bar = tqdm(total=train_cfg.max_steps, desc=f"{train_cfg.method}", unit="step")

    def on_step(info) -> None:
        bar.n = info.step
        bar.set_postfix(loss=f"{info.terms['loss']:.4f}", psi=f"{info.psi_mean:.3f}")
        bar.refresh()

    result = train(dataset=ds, model_cfg=model_cfg, train_cfg=train_cfg, run_dir=args.run_dir,
                   base_checkpoint=default_base(args.preset, args.base), resume=not args.no_resume,
                   callback=on_step, cache_dir=args.cache_dir or default_cache_dir())
    bar.close()
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.steps_done}; "
          f"checkpoint: {result.last_checkpoint}")
    return 0


# ----------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    from pogdiff import checkpoints
    from pogdiff.sampling import generate, image_grid

    ckpt = Path(args.checkpoint)
    if ckpt.is_dir() and not (ckpt / "configs.json").exists():
        latest = checkpoints.latest_checkpoint(ckpt)
        if latest is None:
            raise SystemExit(f"no checkpoint found in {ckpt}: pass a checkpoint-XXXXXX folder or a run folder")
        ckpt = latest
    model = checkpoints.load_model(ckpt)
    prompts = list(args.prompt)
    seeds = list(args.seeds)
    captions = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    cfg = SampleConfig(scheduler=args.scheduler, steps=args.sample_steps, guidance_scale=args.guidance)
    images = generate(model, captions, all_seeds, cfg)
    grid = image_grid(images, ncols=len(seeds), scale=args.scale)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"grid of {len(prompts)} prompt(s) x {len(seeds)} seed(s) written to {args.out}")
    return 0


def cmd_export(args) -> int:
    from pogdiff import checkpoints

    out = checkpoints.export_diffusers(args.checkpoint, args.out)
    print(f"exported to {out}")
    return 0


# ------------------------------------------------------------------------------ benchmarks
def cmd_bench(args) -> int:
    from pogdiff import bench

    return bench.main(args)


def cmd_build(args) -> int:
    from pogdiff import bench

    return bench.build(args)


def add_scale_benches(bench) -> None:
    """``bench knn | sampling | data | gpu`` (pogdiff/bench_scale.py), imported only when run."""
    from pogdiff import bench_scale

    bench_scale.add_parsers(bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pogdiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="demo set and dataset statistics").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("demo", help="write the embedded long-tailed identity set")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--resolution", type=int, default=32, choices=(32, 64), help="image size")
    p.set_defaults(fn=cmd_data_demo)
    p = data.add_parser("stats", help="validate a set and print per-class statistics")
    p.add_argument("source", help="folder, .zip, or 'demo'")
    p.add_argument("--plot", default=None, help="write the long-tail chart to this PNG")
    p.set_defaults(fn=cmd_data_stats)

    p = sub.add_parser("train", help="fine-tune with baseline / pogdiff / cbdm / resample")
    add_train_options(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate a grid for prompts x seeds (same seed, same image)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (latest is used)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one image per seed")
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim", help="sampler")
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--scale", type=int, default=2, help="upscale factor of the grid tiles")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export", help="export weights for diffusers (from_pretrained / load_lora_weights)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_export)

    build = sub.add_parser("build", help="reproduce the shipped artefacts").add_subparsers(dest="build_cmd", required=True)
    p = build.add_parser("base", help="pretrain the tiny base checkpoint on the balanced pretraining identities")
    p.add_argument("--out", default="checkpoints/base-tiny", help="output folder")
    p.add_argument("--steps", type=int, default=3000, help="pretraining steps")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.set_defaults(fn=cmd_build)
    p = build.add_parser("evaluator", help="train the identity + attribute evaluator on generator renders")
    p.add_argument("--out", default="checkpoints/evaluator", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: EvaluatorConfig)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.set_defaults(fn=cmd_build)

    bench = sub.add_parser("bench", help="speed and quality benchmarks").add_subparsers(dest="bench_cmd", required=True)
    p = bench.add_parser("speed", help="PoGDiff vs plain step time, cached vs re-encoded captions")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.set_defaults(fn=cmd_bench)
    p = bench.add_parser("quality", help="baseline vs pogdiff vs cbdm on the demo set, over several seeds")
    p.add_argument("--out", default="results/quality", help="output folder (tables, plots, grids)")
    p.add_argument("--methods", nargs="+", default=["baseline", "pogdiff", "cbdm"], choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    p.add_argument("--quick", action="store_true", help="tiny size for tests")
    p.add_argument("--ship", default=None, help="copy the seed-0 baseline/pogdiff checkpoints to this folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig/PsiConfig field for every run, e.g. psi.psi_max=2")
    p.set_defaults(fn=cmd_bench)
    add_scale_benches(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
