"""Building the shipped artefacts (BENCHMARKS.md "Artefacts"): ``python -m pogdiff build base`` (the
tiny base checkpoint and its sample grid), ``build evaluator`` (the identity evaluator), and the
demo runs ``bench quality --ship`` copies into ``checkpoints/``, their weights stored in float16.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file, save_file

from pogdiff.model import checkpoints
from pogdiff.config import DataConfig, TrainConfig, model_preset
from pogdiff.constants import REPO_ROOT
from pogdiff.evaluation.protocol import EVAL_SAMPLE
from pogdiff.runs.export import strip_local_names
from pogdiff.training.run import train


def store_half_precision(ckpt_dir: str | Path) -> None:
    """Rewrite the UNet weights of a checkpoint in float16, halving what the repository ships.

    :func:`pogdiff.model.checkpoints.load_model` always loads them back as float32; the rounding changes
    sampled pixels by at most a few levels. Optimizer state is not kept (shipped checkpoints are
    for fine-tuning from and sampling, not for resuming), nor where the model was loaded from.
    """
    ckpt_dir = Path(ckpt_dir)
    for weights in (ckpt_dir / checkpoints.UNET_DIR).glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    for name in (checkpoints.STATE_TENSORS, checkpoints.MANIFEST):  # the manifest's sums no longer match
        (ckpt_dir / name).unlink(missing_ok=True)
    strip_local_names(ckpt_dir)  # no path of the machine that built it
    strip_data_path(ckpt_dir)


def strip_data_path(ckpt_dir: str | Path) -> None:
    """Keep only the folder name of the data a checkpoint was trained on (the run fingerprint's
    ``data``, kept for messages only): no path of the machine that built it."""
    state_file = Path(ckpt_dir) / checkpoints.STATE_JSON
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text())
    fingerprint = (state.get("extra") or {}).get("fingerprint") or {}
    if fingerprint.get("data"):
        fingerprint["data"] = Path(fingerprint["data"]).name
        state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def ship_demo_runs(out: Path, ship: Path, seed: int, tables: dict[str, pd.DataFrame], *, steps: int,
                    prefix: str = "demo") -> None:
    """Copy the seed's ``steps`` checkpoint of every recipe where the app finds it (``<prefix>-<recipe>``,
    underscores as hyphens), with its per-class table."""
    for method in tables:
        src = out / "runs" / f"{method}-seed{seed}" / f"checkpoint-{steps:06d}"
        if not (src / "configs.json").exists():
            continue
        dst = ship / f"{prefix}-{method.replace('_', '-')}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        store_half_precision(dst)


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
    store_half_precision(out)
    base_samples(out, pre)
    return out


def base_samples(out: Path, pre) -> Path:
    """A grid of the base model's samples for 8 pretraining identities (4 seeds each), with the
    real pretraining images of the same identities beside it for comparison."""
    from pogdiff.model.sampling import generate, image_grid

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
    """``python -m pogdiff build base | evaluator`` (README "Command line")."""
    if args.build_cmd == "base":
        out = build_base(out=Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"base checkpoint written to {out}")
        return 0
    from pogdiff.data.demo import DemoSpec
    from pogdiff.evaluation.demo_classifier import EvaluatorConfig, train_evaluator

    cfg = EvaluatorConfig(seed=args.seed)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    res = train_evaluator(DemoSpec(kind=args.kind), cfg, Path(args.out))
    print(json.dumps(res, indent=2, default=str))
    return 0
