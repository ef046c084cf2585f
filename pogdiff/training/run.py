"""Fine-tuning runs for the plain, PoGDiff, CBDM and class-resampling methods: :func:`train`.

Structure (improved-diffusion style): ``Trainer.run_loop -> run_step -> forward_backward ->
optimize`` (:mod:`pogdiff.training.trainer`), each method's forward pass in :mod:`pogdiff.method.objectives`,
the data prepared once by :mod:`pogdiff.method.prepare`; what a run sets up before its first step
has a module per concern: config checks (:mod:`pogdiff.training.setup`), the accelerate object and
trackers (:mod:`~pogdiff.training.accelerator`), memory and gradient checkpointing
(:mod:`~pogdiff.training.memory`), the optimizer (:mod:`~pogdiff.training.optimizer`), seeds and the
state a checkpoint restores (:mod:`~pogdiff.training.state`); the run's fingerprint is
:func:`pogdiff.training.run_folder.run_fingerprint`. This module puts a run together (model, data,
resume). The same ``Trainer`` is driven by the CLI, by the app's background thread and by the tests:
it takes a per-step ``callback``, a ``threading.Event`` to stop, and never prints.

Randomness: step ``s`` draws batch rows, timesteps, noise, caption dropout and neighbours from a
CPU ``torch.Generator`` seeded with ``(seed, s)`` (and the process index and micro-batch when
there are several). With several processes the rows of a step are one shared draw of
``processes x batch_size`` rows that each process slices (a data shard per process). A checkpoint
also stores the optimizer, the lr scheduler, the EMA weights and the global RNG states, so a
resumed run ends with the same weights, bit for bit on CPU, as an uninterrupted one.

Faults: a non-finite loss or gradient stops the run with :class:`NonFiniteError` before the
optimizer step (the last good checkpoint stays); checkpoints are written every
``checkpoint_every`` steps and every ``checkpoint_minutes``; a damaged newest checkpoint is
skipped for the one before it; a resume with another method, preset or data is refused.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pogdiff.model import checkpoints
from pogdiff.training import run_folder
from pogdiff.config import ModelConfig, TrainConfig
from pogdiff.method.objectives import objective_for
from pogdiff.method.prepare import prepare_data
from pogdiff.training.run_folder import RunMismatchError, check_same_run, run_fingerprint
from pogdiff.training.accelerator import make_accelerator, tracker_options
from pogdiff.training.setup import check_train_config
from pogdiff.training.balance import with_data_weights
from pogdiff.training.records import StepInfo, TrainResult
from pogdiff.training.trainer import Trainer

logger = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig, *, base_checkpoint: str | Path | None = None, seed: int = 0):
    """The model to fine-tune: a base checkpoint, a Stable Diffusion pipeline, or a fresh tiny UNet."""
    from pogdiff.model import models

    if base_checkpoint:
        return checkpoints.load_model(base_checkpoint)
    if model_cfg.preset == "sd15":
        # LoRA weights start from a random draw: seeded, so the same seed gives the same run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return models.load_stable_diffusion(model_cfg, dtype=torch.float32)
    return models.build_tiny(model_cfg, seed=seed)


def load_resumable(run_dir: Path, fingerprint: dict | None = None):
    """The newest checkpoint of ``run_dir`` that passes :func:`checkpoints.verify_checkpoint` and
    loads: ``(model, state)``, or ``(None, None)`` when the folder has none.

    A damaged checkpoint is skipped with a warning for the one before it. A run with another
    method, preset or data raises :class:`RunMismatchError`; when every checkpoint is damaged a
    ``ValueError`` says so (nothing is silently started over).
    """
    candidates = checkpoints.resume_candidates(run_dir)
    problems = []
    for ckpt in candidates:
        try:
            checkpoints.verify_checkpoint(ckpt)
            state = checkpoints.read_trainer_state(ckpt)
            if fingerprint is not None:
                saved = (state.get("extra") or {}).get("fingerprint")
                if not saved:
                    model_cfg, train_cfg = checkpoints.load_configs(ckpt)
                    saved = {"method": train_cfg.method, "preset": model_cfg.preset}
                check_same_run(run_dir, saved, fingerprint)
            model = checkpoints.load_model(ckpt)
        except RunMismatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to read a checkpoint means "damaged"
            problems.append(f"{ckpt.name}: {exc}")
            logger.warning("cannot resume from %s (%s); trying the previous checkpoint", ckpt, exc)
            continue
        if problems:
            logger.warning("resuming from %s, the newest usable checkpoint", ckpt)
        return model, state
    if candidates:
        raise ValueError(
            f"none of the {len(candidates)} checkpoint(s) in {run_dir} can be resumed ({'; '.join(problems)}); "
            "start a new run (--no-resume, or resume=False) or choose another run folder"
        )
    return None, None


def train(
    *,
    dataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    base_checkpoint: str | Path | None = None,
    resume: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
    preview_callback: Callable[[int, np.ndarray, list[str]], None] | None = None,
    preview_captions: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
    cache_dir: str | Path | None = None,
) -> TrainResult:
    """Fine-tune on ``dataset`` (an ``ImageTextSet``) and write checkpoints under ``run_dir``.

    With ``resume`` and an existing checkpoint in ``run_dir``, training continues from it and ends
    with the same weights as an uninterrupted run with the same seed; the run folder must hold a
    run of the same method, preset and data. Without ``resume`` existing checkpoints are moved
    aside (``replaced-*``) and a new run starts. Before step 1 the run folder is checked for
    writability and room for one checkpoint, and leftover temporary folders are removed.
    With ``balance="from-data"`` the set's own repeats and loss weights fill the config
    (:func:`pogdiff.training.balance.with_data_weights`), so its checkpoints record them.
    """
    train_cfg = with_data_weights(train_cfg, dataset)
    check_train_config(train_cfg, len(dataset))
    size = dataset.images.shape[1]
    if size != model_cfg.resolution:
        raise ValueError(
            f"images are {size}x{size} but the model expects {model_cfg.resolution}x{model_cfg.resolution}: "
            f"load the set with DataConfig(resolution={model_cfg.resolution})"
        )
    run_dir = Path(run_dir)
    accelerator = make_accelerator(train_cfg.mixed_precision, **tracker_options(train_cfg, run_dir))
    checkpoints.check_run_dir(run_dir, 0)
    fingerprint = run_fingerprint(dataset, model_cfg, train_cfg)
    if accelerator.is_main_process:
        checkpoints.clean_temporary(run_dir)
        if not resume:
            run_folder.set_aside(run_dir)
    accelerator.wait_for_everyone()
    model, state = load_resumable(run_dir, fingerprint) if resume else (None, None)
    if model is None:
        model = build_model(model_cfg, base_checkpoint=base_checkpoint, seed=train_cfg.seed)
    else:
        logger.info("resuming from %s at step %d", state["path"], state["step"])
    checkpoints.check_run_dir(run_dir, checkpoints.estimate_checkpoint_bytes(
        model, ema=train_cfg.ema_decay > 0, optimizer=True))
    objective = objective_for(train_cfg)
    data = prepare_data(dataset, model, train_cfg.psi, cache_dir=cache_dir, need_table=objective.needs_table)
    teacher = None
    if objective.needs_teacher:
        # The weights the run started from, also when it resumes: the base again, never the resumed weights.
        teacher = build_model(model_cfg, base_checkpoint=base_checkpoint, seed=train_cfg.seed).unet
    trainer = Trainer(
        model, data, train_cfg, run_dir=run_dir, callback=callback, preview_callback=preview_callback,
        preview_captions=preview_captions, stop_event=stop_event, accelerator=accelerator, teacher_unet=teacher,
        fingerprint=fingerprint,
    )
    if state is not None:
        trainer.restore(state)
    if trainer.step >= train_cfg.max_steps:
        return TrainResult(run_dir, trainer.last_checkpoint, trainer.step, False, trainer.history)
    return trainer.run_loop()
