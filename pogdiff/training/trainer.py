"""The :class:`Trainer`: ``run_loop -> run_step -> forward_backward -> optimize``.

See :mod:`pogdiff.training.run` for how a run is put together around it (data preparation, the
model, resuming); each method's forward pass is in :mod:`pogdiff.method.objectives`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pogdiff.model import checkpoints
from pogdiff.config import (
    SampleConfig,
    TrainConfig,
    uses_balanced_sampling,
)
from pogdiff.method.objectives import (
    INACTIVE_WINDOW,
    Batch,
    ModelAccess,
    objective_for,
    pog_share,
)
from pogdiff.method.prepare import TrainData
from pogdiff.training.balance import class_loss_table, class_names, draw_probabilities
from pogdiff.method.losses import eps_loss_weights
from pogdiff.training.accelerator import TRACKER_PROJECT, make_accelerator, tracker_options
from pogdiff.training.memory import apply_unet_options, frozen_weight_dtype
from pogdiff.training.optimizer import build_optimizer
from pogdiff.training.records import NonFiniteError, RunFiles, StepInfo, TrainResult, tracker_values
from pogdiff.training.setup import check_train_config
from pogdiff.training.state import (
    SEED_STRIDE,
    checkpoint_extra,
    fast_forward_scheduler,
    own_storage,
    restore_state,
    seed_of,
)

logger = logging.getLogger(__name__)

PREVIEW_SAMPLE_STEPS = 10


class Trainer:
    """Fine-tunes ``model`` on ``data`` with the method in ``cfg``; its run folder is kept by
    ``self.files`` (:class:`~pogdiff.training.records.RunFiles`).

    :param callback: called with a :class:`StepInfo` after every step (main process only).
    :param preview_callback: called as ``(step, images uint8 [N x H x W x 3], captions)`` every
        ``cfg.sample_every`` steps when ``preview_captions`` are given (main process only).
    :param stop_event: when set, the loop ends after the current step and writes a checkpoint.
    :param accelerator: an ``accelerate.Accelerator`` already made for this run (else one is made).
    :param fingerprint: what a resume must not change (:func:`pogdiff.training.run_folder.run_fingerprint`),
        kept in the run's record and checkpoints.
    """

    def __init__(
        self,
        model,
        data: TrainData,
        cfg: TrainConfig,
        *,
        run_dir: str | Path,
        callback: Callable[[StepInfo], None] | None = None,
        preview_callback: Callable[[int, np.ndarray, list[str]], None] | None = None,
        preview_captions: Sequence[str] | None = None,
        stop_event: threading.Event | None = None,
        start_step: int = 0,
        history: list[StepInfo] | None = None,
        accelerator=None,
        teacher_unet=None,
        fingerprint: dict | None = None,
    ):
        check_train_config(cfg, len(data))
        objective = objective_for(cfg)
        if objective.needs_table and data.table is None:
            raise ValueError(f"method {cfg.method!r} needs a neighbour table: build TrainData with need_table=True")
        from diffusers.optimization import get_scheduler

        self.model, self.data, self.cfg = model, data, cfg
        # [N] the size of each row's class (T2H's head -> tail rule)
        self.class_count = torch.tensor([len(r) for r in data.class_rows])[data.class_ids]
        # balance "from-data": each class's draw probability; class loss weights: [N] per row (None: all 1)
        names = class_names(data.class_rows, data.subjects)
        self.class_probs = draw_probabilities(cfg, names)
        loss_table = class_loss_table(cfg, names, [len(r) for r in data.class_rows])
        self.row_loss_weights = None if loss_table is None else loss_table[data.class_ids]
        self.run_dir = Path(run_dir)
        self.callback, self.preview_callback = callback, preview_callback
        self.preview_captions = list(preview_captions or [])
        self.stop_event = stop_event or threading.Event()
        self.step = start_step
        self.history: list[StepInfo] = list(history or [])
        self.warnings: list[str] = []
        self._warned_inactive = False
        self.last_checkpoint: Path | None = None
        self.accelerator = (accelerator if accelerator is not None
                            else make_accelerator(cfg.mixed_precision, **tracker_options(cfg, self.run_dir)))
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.num_processes = self.accelerator.num_processes
        self.files = RunFiles(self.run_dir, model=model, cfg=cfg, is_main=self.is_main, fingerprint=fingerprint)
        model.to(self.device, dtype=frozen_weight_dtype(model, self.accelerator.mixed_precision))
        own_storage(model.unet)
        # Gradient checkpointing (decided here, on the training device) and the memory format.
        self.unet_options = apply_unet_options(model, cfg, device=self.device,
                                               mixed_precision=self.accelerator.mixed_precision,
                                               latent_pixels=int(np.prod(data.x0.shape[2:])))
        self.params = [p for p in model.trainable_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg, self.device)
        # model.unet stays the plain module (saving, previews, EMA); training steps run through
        # self.unet, the same module as accelerate prepared it (DDP-wrapped with several processes),
        # compiled when cfg.compile_unet.
        self.unet, self.optimizer = self.accelerator.prepare(model.unet, self.optimizer)
        if cfg.compile_unet:
            self.unet = torch.compile(self.unet)
        self.objective = objective
        self.teacher_unet = None
        if objective.needs_teacher:
            if teacher_unet is None:
                raise ValueError("psi teacher 'base' needs the frozen weights the run started from: pass "
                                 "teacher_unet= (pogdiff.training.run.train builds it from the base checkpoint)")
            self.teacher_unet = teacher_unet.to(self.device, dtype=frozen_weight_dtype(model, self.accelerator.mixed_precision))
            self.teacher_unet.requires_grad_(False).eval()
            if cfg.channels_last:
                self.teacher_unet.to(memory_format=torch.channels_last)
        # Stepped once per optimizer step by optimize(), never through accelerate (which would
        # step it once per process).
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer=getattr(self.optimizer, "optimizer", self.optimizer),
            num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps,
        )
        fast_forward_scheduler(self.lr_scheduler, start_step)
        self.ema = None
        if cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)
        self.null_tokens, self.null_mask = (x.cpu() for x in model.null_context(1))
        self.num_timesteps = model.noise_scheduler.config.num_train_timesteps
        self._last_save_time = time.monotonic()

    # ----------------------------------------------------------------------------------- loop
    def run_loop(self) -> TrainResult:
        """Train until ``cfg.max_steps`` or until ``stop_event`` is set; checkpoint on the way out.

        A :class:`NonFiniteError` leaves the checkpoints on disk as they were and marks the run
        "failed" in its record (``run.json``).
        """
        last_ckpt = self.last_checkpoint
        t_start, steps_timed = time.perf_counter(), 0
        self.model.unet.train()  # a UNet loaded with from_pretrained comes in eval mode
        self._last_save_time = time.monotonic()
        self.files.write_status(state="running", pid=os.getpid())
        self.files.start_history(self.history)
        if self.cfg.report_to != "none":
            self.accelerator.init_trackers(TRACKER_PROJECT)
        outcome = "failed"
        try:
            while self.step < self.cfg.max_steps and not self._any(self.stop_event.is_set()):
                lr = self.current_lr()
                terms, stats = self.run_step()
                self.step += 1
                steps_timed += 1
                sec = (time.perf_counter() - t_start) / steps_timed
                info = StepInfo(
                    step=self.step, max_steps=self.cfg.max_steps, terms=terms, lr=lr, seconds_per_step=sec,
                    eta_seconds=sec * (self.cfg.max_steps - self.step), pog_share=pog_share(terms), **stats,
                )
                self.history.append(info)
                if self.is_main:
                    self._diagnose()
                if self._due(self.cfg.log_every):
                    self.files.flush_history(self.history)
                    if self.cfg.report_to != "none":
                        self.accelerator.log(tracker_values(info), step=self.step)
                    if self.is_main:
                        self._log(info)
                if self.is_main and self.callback:
                    self.callback(info)
                if self._due(self.cfg.sample_every) and self.preview_callback and self.preview_captions and self.is_main:
                    self._preview()
                if self._checkpoint_due() and self.step < self.cfg.max_steps:
                    last_ckpt = self.save()
            if self.is_main:
                self._diagnose(final=True)
            stopped = self.step < self.cfg.max_steps
            if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:06d}"):
                last_ckpt = self.save()
            outcome = "stopped" if stopped else "finished"
        finally:
            self.files.flush_history(self.history)
            if self.cfg.report_to != "none":
                self.accelerator.end_training()
            self.files.write_status(state=outcome, steps_done=self.step, stopped=outcome == "stopped",
                               finished_at=time.time())
        return TrainResult(self.run_dir, last_ckpt, self.step, stopped, self.history, self.warnings)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` steps, and when ``checkpoint_minutes`` of work passed since
        the last save (all processes agree: any one's clock decides)."""
        minutes = self.cfg.checkpoint_minutes
        late = minutes > 0 and time.monotonic() - self._last_save_time >= minutes * 60
        return self._due(self.cfg.checkpoint_every) or self._any(late)

    def _any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (one process never runs alone)."""
        if self.num_processes == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # ------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``checkpoint-{step}`` (main process; the others wait) and return its path.

        Refuses (:class:`NonFiniteError`) to write weights that are not finite.
        """
        bad = next((i for i, p in enumerate(self.params) if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise self._non_finite(f"trainable parameter {bad} holds non-finite values", "weights")
        self.accelerator.wait_for_everyone()
        path = self.run_dir / f"checkpoint-{self.step:06d}"
        self.files.flush_history(self.history)  # before the checkpoint: its steps are always in the history file
        if self.is_main:
            extra, tensors = checkpoint_extra(fingerprint=self.files.fingerprint, lr_scheduler=self.lr_scheduler,
                                              scaler=self.accelerator.scaler, num_processes=self.num_processes)
            path = self.files.write_checkpoint(self.step, optimizer=self.optimizer, ema=self.ema, extra=extra,
                                               extra_tensors=tensors)
            logger.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = path
        self._last_save_time = time.monotonic()
        return path

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint read by :func:`pogdiff.model.checkpoints.read_trainer_state`: its
        step, the history up to it, and the state :func:`pogdiff.training.state.restore_state` puts back."""
        self.step = int(state["step"])
        self.history = self.files.history_upto(self.step, state.get("extra") or {})
        restore_state(state, model=self.model, params=self.params, optimizer=self.optimizer,
                      lr_scheduler=self.lr_scheduler, scaler=self.accelerator.scaler, ema=self.ema,
                      num_processes=self.num_processes)
        self.last_checkpoint = state.get("path")

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return float(self.lr_scheduler.get_last_lr()[0])

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator of (step, micro-batch) on this process. One process, first micro-batch:
        the seed of earlier versions, so their runs and benchmarks reproduce."""
        if self.num_processes == 1 and micro == 0:
            seed = (self.cfg.seed * SEED_STRIDE + step) * 8
        else:
            seed = seed_of(self.cfg.seed, step, micro, self.accelerator.process_index)
        return torch.Generator().manual_seed(seed)

    def rows_generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator shared by all processes for the rows of (step, micro-batch)."""
        return torch.Generator().manual_seed(seed_of(self.cfg.seed, step, micro))

    # ----------------------------------------------------------------------------------- step
    def run_step(self) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the loss
        terms and the objective's named statistics, each averaged over micro-batches and processes."""
        accum = self.cfg.gradient_accumulation_steps
        multi = self.num_processes > 1
        sums: dict[str, torch.Tensor] = {}
        stat_sums: dict[str, float] = {}
        for micro in range(accum):
            g = self.generator(self.step, micro)
            batch = self.sample_batch(g, self.rows_generator(self.step, micro) if multi else None)
            sync = micro == accum - 1 or not multi
            with (contextlib.nullcontext() if sync else self.accelerator.no_sync(self.unet)):
                with self.accelerator.autocast():
                    terms, stats = self.forward_backward(batch, g)
            for k, v in terms.items():
                mean = v.detach().float().mean()
                sums[k] = mean if k not in sums else sums[k] + mean
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
        names = list(sums)
        values = torch.stack([sums[k] for k in names]) / accum if accum > 1 else torch.stack([sums[k] for k in names])
        stat_names = sorted(stat_sums)  # the same objective, so the same names, on every process
        stat_values = torch.tensor([stat_sums[k] for k in stat_names], dtype=torch.float32) / accum
        if multi:
            values = self.accelerator.reduce(values.to(self.device), reduction="mean")
            if stat_names:
                stat_values = self.accelerator.reduce(stat_values.to(self.device), reduction="mean")
        out = {k: float(v) for k, v in zip(names, values.cpu())}
        self._check_finite(out)
        self.optimize()
        return out, {k: float(v) for k, v in zip(stat_names, stat_values.cpu())}

    def _check_finite(self, terms: dict[str, float]) -> None:
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            term = next((k for k in bad if k != "loss"), bad[0])
            raise self._non_finite(f"the {term!r} term of the loss is {terms[term]}", term)

    def _non_finite(self, what: str, term: str) -> NonFiniteError:
        last = self.last_checkpoint or checkpoints.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        psi = self.objective.divergence_hint()
        clip = f"grad_clip > 0 (now {self.cfg.grad_clip:g})" if self.cfg.grad_clip <= 0 else "a smaller grad_clip"
        return NonFiniteError(
            f"non-finite loss at step {self.step + 1}: {what}; training stopped before the optimizer "
            f"step and {kept}. Try a lower learning rate (now {self.cfg.learning_rate:g}){psi}, {clip}"
            + (f", or mixed_precision='no' (now {self.cfg.mixed_precision!r})" if self.cfg.mixed_precision != "no" else "")
            + ".",
            step=self.step + 1, term=term,
        )

    def sample_batch(self, g: torch.Generator, g_rows: torch.Generator | None = None) -> Batch:
        """Draw rows, timesteps, noise and caption dropout for one micro-batch from ``g``.

        With ``g_rows`` (several processes) the rows are this process's slice of one draw of
        ``processes x batch_size`` rows from ``g_rows``, the same draw on every process.
        """
        b = self.cfg.batch_size
        if g_rows is None:
            rows = self._draw_rows(b, g)
        else:
            p = self.accelerator.process_index
            rows = self._draw_rows(b * self.num_processes, g_rows)[p * b : (p + 1) * b]
        x0 = self.data.x0[rows]
        t = torch.randint(0, self.num_timesteps, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        drop = torch.rand(b, generator=g) < self.cfg.caption_dropout
        if self.cfg.noise_offset > 0:
            offset = torch.randn((b, x0.shape[1], *([1] * (x0.ndim - 2))), generator=g)
            eps = eps + self.cfg.noise_offset * offset
        return Batch(rows=rows, x0=x0, t=t, eps=eps, drop=drop)

    def _draw_rows(self, b: int, g: torch.Generator) -> torch.Tensor:
        n = len(self.data)
        if self.class_probs is not None:
            return self._balanced_rows(b, g, probs=self.class_probs)
        if uses_balanced_sampling(self.cfg):
            return self._balanced_rows(b, g, alpha=self.cfg.balance_alpha)
        if b <= n:
            return torch.randperm(n, generator=g)[:b]
        return torch.randint(0, n, (b,), generator=g)

    def _balanced_rows(self, b: int, g: torch.Generator, *, alpha: float = 0.0,
                       probs: torch.Tensor | None = None) -> torch.Tensor:
        """Class-balanced draw: a class with probability proportional to ``n_c ** alpha``
        (``alpha = 0``: uniformly) or ``probs`` when given, then a row of that class uniformly."""
        if probs is not None:
            classes = torch.multinomial(probs, b, replacement=True, generator=g)
        elif alpha == 0.0:
            classes = torch.randint(0, len(self.data.class_rows), (b,), generator=g)
        else:
            classes = torch.multinomial(class_draw_weights(self.data.class_rows, alpha), b, replacement=True,
                                        generator=g)
        picks = torch.rand(b, generator=g)
        return torch.stack(
            [self.data.class_rows[c][int(p * len(self.data.class_rows[c]))] for c, p in zip(classes.tolist(), picks)]
        )

    def caption_states(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached token states [B x L x C] and mask [B x L] of caption rows (fresh copies)."""
        emb = self.data.text.index(rows)
        return emb.tokens.clone(), emb.mask.clone()

    def context(self, rows: torch.Tensor, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and mask of caption rows, with dropped rows replaced by the empty caption."""
        tokens, mask = self.caption_states(rows)
        if drop is not None and bool(drop.any()):
            tokens[drop] = self.null_tokens.to(tokens.dtype)
            mask[drop] = self.null_mask
        return tokens.to(self.device), mask.to(self.device)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, rows: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """eps of the UNet being trained for caption ``rows`` (``drop``: empty caption instead)."""
        tokens, mask = self.context(rows, drop)
        return self.model.predict_eps(x_t, t, tokens, mask, unet=self.unet)

    def predict_teacher(self, x_t: torch.Tensor, t: torch.Tensor, rows: torch.Tensor,
                        drop: torch.Tensor | None = None) -> torch.Tensor:
        """eps of the frozen teacher UNet for caption ``rows`` (no gradients)."""
        tokens, mask = self.context(rows, drop)
        with torch.no_grad():
            return self.model.predict_eps(x_t, t, tokens, mask, unet=self.teacher_unet)

    def forward_backward(self, batch: Batch, g: torch.Generator):
        """One forward/backward pass of the configured objective (:mod:`pogdiff.method.objectives`);
        returns (terms, the objective's named statistics)."""
        batch = batch.on(self.device)
        x_t = self.model.noise_scheduler.add_noise(batch.x0_dev, batch.eps_dev, batch.t_dev)
        if self.cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        access = ModelAccess(predict=self.predict, balanced_rows=self._balanced_rows, table=self.data.table,
                             betas=self.model.noise_scheduler.betas, num_timesteps=self.num_timesteps,
                             predict_teacher=self.predict_teacher if self.teacher_unet is not None else None,
                             class_count=self.class_count)
        terms, stats = self.objective.terms(access, batch, x_t, g)
        weights = eps_loss_weights(batch.t_dev, self.model.noise_scheduler, snr_gamma=self.cfg.snr_gamma)
        if self.row_loss_weights is not None:
            rows_w = self.row_loss_weights[batch.rows].to(self.device)
            weights = rows_w if weights is None else weights * rows_w
        if weights is not None:
            terms = {k: v * weights.to(v.device) for k, v in terms.items()}
        loss = terms["loss"].mean()
        if self.cfg.gradient_accumulation_steps > 1:
            loss = loss / self.cfg.gradient_accumulation_steps
        self.accelerator.backward(loss)
        return terms, stats

    def _diagnose(self, *, final: bool = False) -> None:
        """Warn once, in the log and in ``self.warnings``, when the objective's own diagnosis says it
        behaves like another method (PoGDiff: the PoG term stays negligible).

        During training the last ``INACTIVE_WINDOW`` steps are judged once that many have run (the
        share grows as the model learns the captions); at the end of a shorter run, all of it.
        """
        if self._warned_inactive or (len(self.history) < INACTIVE_WINDOW and not final):
            return
        message = self.objective.diagnose(self.history[-INACTIVE_WINDOW:])
        if message:
            self._warned_inactive = True
            self.warnings.append(message)
            logger.warning(message)

    def _log(self, info: StepInfo) -> None:
        stats = self.objective.log_stats(info)
        logger.info("step %d/%d loss %.4f %s(%.3fs/step)", info.step, info.max_steps, info.terms["loss"],
                    f"{stats} " if stats else "", info.seconds_per_step)

    def optimize(self) -> None:
        """Clip (and measure) the gradient, step the optimizer, the lr scheduler and the EMA.

        A non-finite gradient norm raises :class:`NonFiniteError` before the weights change
        (with fp16 loss scaling the scaler skips such steps itself).
        """
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        if norm is not None and self.accelerator.scaler is None and not math.isfinite(float(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._non_finite(f"the gradient norm is {float(norm)}", "gradient")
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)

    def _preview(self) -> None:
        from pogdiff.model.sampling import generate

        unet = self.model.unet
        was_training = unet.training
        unet.eval()
        try:
            cfg = SampleConfig(steps=PREVIEW_SAMPLE_STEPS)
            images = generate(self.model, self.preview_captions, list(range(len(self.preview_captions))), cfg)
        finally:
            unet.train(was_training)
        self.preview_callback(self.step, images, list(self.preview_captions))


def class_draw_weights(class_rows: Sequence, alpha: float) -> torch.Tensor:
    """Per-class draw probabilities ``n_c ** alpha / sum_k n_k ** alpha`` (float64 ``[C]``).

    ``alpha = 0``: every class alike; ``alpha = 1``: as often as its share of the rows, which is
    what drawing rows uniformly gives.
    """
    counts = torch.tensor([len(r) for r in class_rows], dtype=torch.float64)
    weights = counts ** alpha
    return weights / weights.sum()
