"""Command line: ``python -m pogdiff <command> ...``; ``--help`` on every command lists its options.

Heavy modules are imported inside the handlers so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pogdiff.config import (
    ADAMW_KERNELS,
    BALANCES,
    CHECKPOINTING,
    LIMITS,
    METHODS,
    TEACHERS,
    OPTIMIZERS,
    POOLS,
    PRESETS,
    SCHEDULES,
    TRACKERS,
    DataConfig,
    SampleConfig,
    configs_from_options,
)
from pogdiff.constants import DEFAULT_BASE
from pogdiff.server.safety import bounded

logger = logging.getLogger("pogdiff")

DEMO = "demo"
FAMILIES = "families"
DEMO_KINDS = ("identities", FAMILIES)


def resolve_data(source: str, split: str = "train", *, resolution: int = 32):
    """Load an image-text set: a folder, a .zip, ``demo`` (the embedded identity set) or
    ``families`` (the embedded look-alike families set)."""
    from pogdiff.data import DemoSpec, ensure_demo, load_image_text_set

    cfg = DataConfig(resolution=resolution)
    if source == DEMO:
        return load_image_text_set(ensure_demo() / split, cfg)
    if source == FAMILIES:
        return load_image_text_set(ensure_demo(DemoSpec(kind=FAMILIES)) / split, cfg)
    return load_image_text_set(source, cfg)


STEPS = bounded(int, 1, LIMITS.max_steps)
BATCH = bounded(int, 1, LIMITS.max_batch_size)
SEED = bounded(int, 0, LIMITS.max_seed)


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bounds on how many prompts and seeds one command samples, before anything is loaded."""
    if args.command != "sample":
        return
    if len(args.seeds) > LIMITS.max_seeds:
        parser.error(f"--seeds: {len(args.seeds)} seeds given, at most {LIMITS.max_seeds} (config.Limits)")
    if len(args.prompt) > LIMITS.max_prompts:
        parser.error(f"--prompt: {len(args.prompt)} prompts given, at most {LIMITS.max_prompts} (config.Limits)")


# ------------------------------------------------------------------------------------- data
def cmd_data_demo(args) -> int:
    from pogdiff.data.demo import DemoSpec, make_demo_set

    out = make_demo_set(Path(args.out), DemoSpec(seed=args.seed, resolution=args.resolution))
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


def cmd_data_kohya(args) -> int:
    from pogdiff.config import TrainConfig
    from pogdiff.runs.trainer_export import kohya_dataset_config, onetrainer_concepts
    from pogdiff.training.balance import with_data_weights

    ds = resolve_data(args.source)
    cfg, run = TrainConfig(), ""
    if args.checkpoint:
        from pogdiff.model import checkpoints

        ckpt = checkpoint_of(args.checkpoint)
        cfg, run = checkpoints.load_configs(ckpt)[1], ckpt.parent.name
    cfg = with_data_weights(cfg, ds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(kohya_dataset_config(ds, cfg, run=run), encoding="utf-8")
    print(f"kohya dataset config written to {args.out}")
    if args.onetrainer:
        Path(args.onetrainer).write_text(onetrainer_concepts(ds, cfg), encoding="utf-8")
        print(f"OneTrainer concepts written to {args.onetrainer}")
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
    p.add_argument("--steps", type=STEPS, default=None, help=f"optimisation steps (1..{LIMITS.max_steps})")
    p.add_argument("--batch-size", type=BATCH, default=None, help=f"batch size (1..{LIMITS.max_batch_size})")
    # No upper bound on the command line: a diverging learning rate is stopped by the trainer, which
    # names the non-finite loss (the app's server caps it at Limits.max_learning_rate).
    p.add_argument("--lr", type=bounded(float, 1e-12, float("inf")), default=None, help="learning rate (> 0)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of batches, noise and neighbours")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="autocast dtype (default: accelerate's config / launch setting, else the preset's)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (0 disables)")
    p.add_argument("--checkpoint-every", type=STEPS, default=None, help="steps between checkpoints")
    p.add_argument("--checkpoint-minutes", type=float, default=None,
                   help="minutes of training between checkpoints (default 5; 0 disables)")
    p.add_argument("--checkpoints-total-limit", type=int, default=None,
                   help="numbered checkpoints kept in the run folder (default 2)")
    p.add_argument("--lr-scheduler", default=None,
                   help="diffusers lr schedule: constant_with_warmup (default), linear, cosine, constant, ...")
    p.add_argument("--warmup-steps", type=int, default=None, help="lr warm-up steps")
    p.add_argument("--gradient-accumulation-steps", type=int, default=None,
                   help="micro-batches per optimizer step (default 1)")
    p.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting gamma (0 disables; 5 is usual)")
    p.add_argument("--noise-offset", type=float, default=None, help="offset-noise strength (0 disables)")
    p.add_argument("--psi-max", type=float, default=None,
                   help=f"PoGDiff: maximum neighbour precision psi (0..{LIMITS.max_psi_max:g})")
    p.add_argument("--k", type=bounded(int, 1, LIMITS.max_k), default=None,
                   help=f"PoGDiff: neighbours per caption (1..{LIMITS.max_k})")
    p.add_argument("--no-density", action="store_true", help="PoGDiff: drop the density factor of psi")
    p.add_argument("--no-image-sim", action="store_true", help="PoGDiff: drop the image-similarity factor")
    p.add_argument("--no-text-sim", action="store_true", help="PoGDiff: drop the text-similarity factor")
    p.add_argument("--neighbour-pool", choices=POOLS, default=None,
                   help="PoGDiff: where neighbours come from (README 'The method')")
    p.add_argument("--psi-schedule", choices=SCHEDULES, default=None,
                   help="PoGDiff: psi constant over timesteps, or the Gaussian timestep-dependent psi")
    p.add_argument("--balanced-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="draw batches class-balanced (always on for --method resample)")
    p.add_argument("--balance-alpha", type=float, default=None,
                   help="balanced batches draw a class with probability ~ n_c ** alpha (0 class-uniform, 1 as plain)")
    p.add_argument("--balance", choices=BALANCES, default=None,
                   help="'method': the method's batches; 'from-data': each class as often as the set's kohya / "
                        "OneTrainer repeats say (n_c * repeats), with its loss weights")
    p.add_argument("--class-loss-beta", type=float, default=None,
                   help="weight each class's loss by n_c ** -beta, mean 1 over a plain batch (0 off, 1 every class alike)")
    p.add_argument("--class-loss-weight", type=class_weight_item, action="append", default=None, metavar="CLASS=WEIGHT",
                   help="multiply one class's loss by WEIGHT (repeat the flag per class)")
    p.add_argument("--psi-teacher", choices=TEACHERS, default=None,
                   help="PoGDiff: the neighbour's prediction from the live model or the frozen base weights")
    p.add_argument("--neighbour-sampling", choices=("similarity", "nearest"), default=None,
                   help="PoGDiff: draw one of k neighbours by similarity, or always the nearest")
    p.add_argument("--cbdm-tau", type=float, default=None, help="CBDM regulariser weight")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw (default) or adamw8bit (bitsandbytes' 8-bit AdamW; needs bitsandbytes and CUDA)")
    p.add_argument("--report-to", choices=TRACKERS, default=None,
                   help="experiment tracker: none (default) or tensorboard (event files in RUN_DIR/logs)")
    p.add_argument("--gradient-checkpointing", choices=CHECKPOINTING, default=None,
                   help="recompute UNet activations in the backward pass: auto (sd15 default: on only when the free "
                        "CUDA memory is below the step's estimated need), on, off (tiny default)")
    p.add_argument("--adamw-kernel", choices=ADAMW_KERNELS, default=None,
                   help="torch AdamW implementation: auto (default: fused on CUDA), fused, foreach, loop")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet weights and inputs in channels-last memory format (default off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train through torch.compile(unet) (default off; the first steps compile)")
    p.add_argument("--resolution", type=int, default=None,
                   help="training image size in pixels (default: the preset's, 32 for tiny, 512 for sd15); the "
                        "data are loaded at it. The shipped tiny base was trained at 32 px: use --base none otherwise")
    p.add_argument("--no-resume", action="store_true",
                   help="start a new run even if run-dir has checkpoints (they are moved to run-dir/replaced-*)")
    p.add_argument("--cache-dir", default=None,
                   help="where caption embeddings and VAE latents are cached (default: $POGDIFF_CACHE or ~/.cache/pogdiff)")


def configs_from_args(args):
    """``train`` flags -> ``(ModelConfig, TrainConfig)`` through :func:`pogdiff.config.configs_from_options`."""
    mixed_precision = args.mixed_precision
    if mixed_precision is None:
        from pogdiff.training.accelerator import accelerate_mixed_precision

        mixed_precision = accelerate_mixed_precision()
    return configs_from_options(
        method=args.method, preset=args.preset, pretrained=args.pretrained, resolution=args.resolution,
        steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, mixed_precision=mixed_precision,
        ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, checkpoints_total_limit=args.checkpoints_total_limit,
        lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset, optimizer=args.optimizer, report_to=args.report_to,
        cbdm_tau=args.cbdm_tau, balanced_sampling=args.balanced_sampling, psi_max=args.psi_max, k=args.k,
        use_density=not args.no_density, use_image_sim=not args.no_image_sim, use_text_sim=not args.no_text_sim,
        neighbour_pool=args.neighbour_pool, psi_schedule=args.psi_schedule,
        neighbour_sampling=args.neighbour_sampling, balance_alpha=args.balance_alpha, psi_teacher=args.psi_teacher,
        gradient_checkpointing=args.gradient_checkpointing, adamw_kernel=args.adamw_kernel,
        channels_last=args.channels_last, compile_unet=args.compile, balance=args.balance,
        class_loss_beta=args.class_loss_beta,
        class_loss_weights=dict(args.class_loss_weight) if args.class_loss_weight else None,
    )


def class_weight_item(text: str) -> tuple[str, float]:
    """``"red circle=2"`` -> ``("red circle", 2.0)`` (``--class-loss-weight``)."""
    name, sep, raw = text.rpartition("=")
    try:
        weight = float(raw)
    except ValueError:
        weight = float("nan")
    if not sep or not name.strip() or not weight > 0 or weight == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: write CLASS=WEIGHT with a weight above 0, e.g. 'red circle=2'")
    return name.strip(), weight


def default_cache_dir() -> Path:
    from pogdiff.config import cache_root

    return cache_root() / "embeddings"


def default_base(preset: str, base: str | None) -> str | None:
    if base == "none":
        return None
    if base:
        return base
    return str(DEFAULT_BASE) if preset == "tiny" and DEFAULT_BASE.exists() else None


def check_base_resolution(model_cfg, base: str | None) -> None:
    """A tiny pixel base checkpoint only fine-tunes at the size it was trained at."""
    if base is None or model_cfg.preset != "tiny":
        return
    configs = Path(base) / "configs.json"
    if not configs.is_file():
        return  # a run folder or a damaged base: build_model says what is wrong
    trained = json.loads(configs.read_text()).get("model", {}).get("resolution")
    if trained is not None and int(trained) != model_cfg.resolution:
        raise ValueError(f"the base checkpoint {base} was trained at {trained} px but --resolution is "
                         f"{model_cfg.resolution}: use --resolution {trained}, or --base none to train from scratch")


def cmd_train(args) -> int:
    import os

    from tqdm import tqdm

    from pogdiff.training.records import NonFiniteError

    from pogdiff.training.run import train

    main_process = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun / accelerate launch
    model_cfg, train_cfg = configs_from_args(args)
    check_base_resolution(model_cfg, default_base(args.preset, args.base))
    ds = resolve_data(args.data, resolution=model_cfg.resolution)
    bar = tqdm(total=train_cfg.max_steps, desc=f"{train_cfg.method}", unit="step", disable=not main_process)

    def on_step(info) -> None:
        bar.n = info.step
        post = {"loss": f"{info.terms['loss']:.4f}"}
        if train_cfg.method == "pogdiff":
            post.update(psi=f"{info.psi_mean:.3f}", active=f"{100 * info.psi_active:.0f}%",
                        pog=f"{100 * info.pog_share:.2f}%")
        elif train_cfg.method == "t2h":
            post.update(transferred=f"{100 * info.transfer_rate:.0f}%")
        bar.set_postfix(**post)
        bar.refresh()

    try:
        result = train(dataset=ds, model_cfg=model_cfg, train_cfg=train_cfg, run_dir=args.run_dir,
                       base_checkpoint=default_base(args.preset, args.base), resume=not args.no_resume,
                       callback=on_step, cache_dir=args.cache_dir or default_cache_dir())
    except NonFiniteError as exc:
        bar.close()
        print(f"error: training diverged: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # run folder not writable / no room for a checkpoint
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if main_process:
        print(f"{'stopped' if result.stopped else 'finished'} at step {result.steps_done}; "
              f"checkpoint: {result.last_checkpoint}")
    return 0


# ----------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    from pogdiff.model import checkpoints
    from pogdiff.model.sampling import generate, image_grid

    model = checkpoints.load_model(checkpoint_of(args.checkpoint))
    prompts = list(args.prompt)
    seeds = list(args.seeds)
    captions = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    cfg = SampleConfig(scheduler=args.scheduler, steps=args.sample_steps, guidance_scale=args.guidance,
                       precision=args.precision)
    images = generate(model, captions, all_seeds, cfg)
    grid = image_grid(images, ncols=len(seeds), scale=args.scale)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"grid of {len(prompts)} prompt(s) x {len(seeds)} seed(s) written to {args.out}")
    return 0


def checkpoint_of(path: str) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run folder."""
    from pogdiff.model import checkpoints

    ckpt = Path(path)
    if ckpt.is_dir() and not (ckpt / "configs.json").exists():
        latest = checkpoints.latest_checkpoint(ckpt)
        if latest is None:
            raise SystemExit(f"no checkpoint found in {ckpt}: pass a checkpoint-XXXXXX folder or a run folder")
        ckpt = latest
    return ckpt


def cmd_export(args) -> int:
    from pogdiff.runs import export

    card = export.CardInfo(license=args.license, base_model=args.base_model, prompts=tuple(args.prompt or ()),
                           metrics_csv=args.metrics)
    out = export.export_diffusers(args.checkpoint, args.out, use_ema=args.ema, merge=args.merge, card=card)
    print(f"exported to {out}")
    if args.push_to_hub:
        url = export.push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


# ------------------------------------------------------------------------------ artefacts
def cmd_build(args) -> int:
    from pogdiff.bench import ship

    return ship.build(args)


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
    p = data.add_parser("kohya-config", help="a run's class balance as a kohya dataset_config.toml (and OneTrainer concepts)")
    p.add_argument("source", help="the run's data: folder, .zip, or 'demo'")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint or run folder whose balance is written (default: the default recipe's)")
    p.add_argument("--out", required=True, help="the dataset_config.toml to write")
    p.add_argument("--onetrainer", default=None, metavar="JSON", help="also write OneTrainer concepts here")
    p.set_defaults(fn=cmd_data_kohya)

    p = sub.add_parser("train", help="fine-tune with baseline / pogdiff / cbdm / resample")
    add_train_options(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate a grid for prompts x seeds (same seed, same image)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (latest is used)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2, 3],
                   help=f"one image per seed (at most {LIMITS.max_seeds})")
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim", help="sampler")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="UNet arithmetic: float32, or bfloat16 autocast (faster where supported; BENCHMARKS.md \"Sampling\")")
    p.add_argument("--sample-steps", type=bounded(int, 1, LIMITS.max_sample_steps), default=25,
                   help=f"denoising steps (1..{LIMITS.max_sample_steps})")
    p.add_argument("--guidance", type=bounded(float, 0.0, LIMITS.max_guidance), default=3.0,
                   help="classifier-free guidance scale")
    p.add_argument("--scale", type=bounded(int, 1, 16), default=2, help="upscale factor of the grid tiles")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export", help="export a diffusers folder with a model card (from_pretrained / load_lora_weights)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (latest is used)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--merge", action="store_true", help="sd15 LoRA: also write the pipeline with the LoRA fused, in merged/")
    p.add_argument("--base-model", default=None, help="Hub id of the base model for the card (sd15 from a local folder)")
    p.add_argument("--license", default=None, help="license in the model card (default: mit for tiny, other for sd15)")
    p.add_argument("--prompt", action="append", default=None,
                   help="widget prompt of the model card; repeat for several (default: the rarest classes)")
    p.add_argument("--metrics", default=None, help="per-class metrics CSV (default: per_class.csv beside the checkpoint)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hub model repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")
    p.set_defaults(fn=cmd_export)

    build = sub.add_parser("build", help="reproduce the shipped artefacts").add_subparsers(dest="build_cmd", required=True)
    p = build.add_parser("base", help="pretrain the tiny base checkpoint on the balanced pretraining identities")
    p.add_argument("--out", default=str(DEFAULT_BASE), help="output folder (default: the shipped base, checkpoints/base-tiny)")
    p.add_argument("--steps", type=STEPS, default=3000, help="pretraining steps")
    p.add_argument("--batch-size", type=BATCH, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.set_defaults(fn=cmd_build)
    p = build.add_parser("evaluator", help="train the identity + attribute evaluator on generator renders")
    p.add_argument("--out", default="checkpoints/evaluator", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: EvaluatorConfig)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--kind", choices=DEMO_KINDS, default="identities",
                   help="which embedded set's identities it names (identities or families)")
    p.set_defaults(fn=cmd_build)

    from pogdiff.bench import add_parsers as add_benchmarks  # each benchmark registers its own commands

    bench = sub.add_parser("bench", help="benchmarks (BENCHMARKS.md)").add_subparsers(dest="bench_cmd", required=True)
    add_benchmarks(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_counts(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
