"""Fine-tuning loop for the plain, PoGDiff, CBDM and class-resampling methods.

Structure (improved-diffusion style): ``Trainer.run_loop -> run_step -> forward_backward ->
optimize``. The same ``Trainer`` is driven by the CLI, by the app's background thread and by the
tests: it takes a per-step ``callback``, a ``threading.Event`` to stop, and never prints.

Randomness: step ``s`` draws batch rows, timesteps, noise, caption dropout and neighbours from a
CPU ``torch.Generator`` seeded with ``(seed, s, process_index)``. Resuming from a checkpoint at
step ``s`` therefore reproduces the uninterrupted run exactly, without saving RNG state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pogdiff import checkpoints, losses
from pogdiff.config import METHODS, ModelConfig, SampleConfig, TrainConfig, uses_balanced_sampling
from pogdiff.neighbors import NeighbourTable, build_neighbour_table, gaussian_psi_factor, image_features
from pogdiff.text import CachedEncoder, TextEmbeddings

logger = logging.getLogger(__name__)

PREVIEW_SAMPLE_STEPS = 10
_SEED_STRIDE = 1_000_003


@dataclass
class StepInfo:
    """What the trainer reports after every optimisation step."""

    step: int
    max_steps: int
    terms: dict[str, float]
    lr: float
    psi_mean: float
    psi_active: float  # share of batch rows that ran the neighbour forward pass
    seconds_per_step: float
    eta_seconds: float
    # PoGDiff only: the PoG term's share of the loss, mean(pog) / mean(loss) over the batch.
    pog_share: float = 0.0


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path | None
    steps_done: int
    stopped: bool
    history: list[StepInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. PoGDiff inactive on this data


@dataclass
class TrainData:
    """Everything a step needs, computed once per dataset.

    :param x0: [N x C x h x w] images in diffusion space (pixels in [-1, 1] or VAE latents).
    :param text: caption embeddings (tokens are the UNet context, pooled the neighbour index).
    :param class_ids: [N] int64 class index of each row.
    :param table: neighbour table with psi per (row, neighbour), or None when not needed.
    """

    x0: torch.Tensor
    text: TextEmbeddings
    captions: list[str]
    subjects: list[str]
    class_ids: torch.Tensor
    table: NeighbourTable | None

    def __post_init__(self) -> None:
        n = self.x0.shape[0]
        assert len(self.text) == n and len(self.captions) == n and len(self.subjects) == n
        self.class_rows = [
            torch.nonzero(self.class_ids == c).flatten() for c in range(int(self.class_ids.max()) + 1)
        ]

    def __len__(self) -> int:
        return self.x0.shape[0]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N x H x W x 3] -> float32 [N x 3 x H x W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_dataset_images(model, images: np.ndarray, *, batch_size: int = 64,
                          cache_dir: str | Path | None = None) -> torch.Tensor:
    """Map uint8 images to the model's diffusion space once (VAE latents for SD), on CPU.

    For latent models with a ``cache_dir``, the latents are stored as safetensors keyed by a hash
    of the pixels and the VAE's weights, so a second run on the same set skips the VAE.
    """
    path = None
    if cache_dir is not None and model.vae is not None:
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
        digest.update(json.dumps(dict(model.vae.config), sort_keys=True, default=str).encode())
        digest.update(str(sum(float(p.float().sum()) for p in model.vae.parameters())).encode())
        path = Path(cache_dir) / f"latents-{digest.hexdigest()[:24]}.safetensors"
        if path.exists():
            return load_file(path)["x0"]
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images_to_tensor(images[start : start + batch_size]).to(model.device)
        chunks.append(model.encode_images(batch).float().cpu())
    x0 = torch.cat(chunks)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"x0": x0.contiguous()}, tmp)
        os.replace(tmp, path)
    return x0


def prepare_data(
    dataset, model, psi_cfg, *, cache_dir: str | Path | None = None, need_table: bool = True
) -> TrainData:
    """Encode captions (cached by content hash) and images once, and build the neighbour table.

    :param dataset: an ``ImageTextSet`` (``images`` uint8 [N x H x W x 3], ``captions``, ``subjects``).
    """
    captions = list(dataset.captions)
    subjects = list(dataset.subjects)
    if len(captions) == 0:
        raise ValueError("the dataset is empty: load at least two images with captions before training")
    encoder = CachedEncoder(model.text_encoder, cache_dir) if cache_dir else model.text_encoder
    text = encoder.encode(captions).to("cpu")
    x0 = encode_dataset_images(model, dataset.images, cache_dir=cache_dir)
    classes = sorted(set(subjects))
    index = {c: i for i, c in enumerate(classes)}
    class_ids = torch.tensor([index[s] for s in subjects], dtype=torch.long)
    table = None
    if need_table and len(captions) > 1:
        feats = image_features(dataset.images if model.vae is None else x0)
        k = min(psi_cfg.k, len(captions) - 1)
        table = build_neighbour_table(
            text.pooled.numpy(), feats, dataclasses.replace(psi_cfg, k=k), classes=subjects, clean=x0
        )
    return TrainData(x0=x0, text=text, captions=captions, subjects=subjects, class_ids=class_ids, table=table)


def check_train_config(cfg: TrainConfig, n_samples: int) -> None:
    """Validate a TrainConfig once, with messages that name the bad value and what is allowed."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {cfg.caption_dropout}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {cfg.mixed_precision!r}")
    if cfg.psi.psi_max < 0:
        raise ValueError(f"psi_max must be >= 0, got {cfg.psi.psi_max}")
    if cfg.psi.sampling not in ("similarity", "nearest"):
        raise ValueError(f"psi sampling must be 'similarity' or 'nearest', got {cfg.psi.sampling!r}")
    if cfg.method == "pogdiff" and n_samples < 2:
        raise ValueError("PoGDiff needs at least 2 training images to find neighbours")


def _make_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # Inside one process (app, tests) successive runs may ask for different precisions.
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision)


class Trainer:
    """Fine-tunes ``model`` on ``data`` with the method in ``cfg``.

    :param callback: called with a :class:`StepInfo` after every step.
    :param preview_callback: called as ``(step, images uint8 [N x H x W x 3], captions)`` every
        ``cfg.sample_every`` steps when ``preview_captions`` are given.
    :param stop_event: when set, the loop ends after the current step and writes a checkpoint.
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
    ):
        check_train_config(cfg, len(data))
        if cfg.method == "pogdiff" and data.table is None:
            raise ValueError("method 'pogdiff' needs a neighbour table: build TrainData with need_table=True")
        self.model, self.data, self.cfg = model, data, cfg
        self.run_dir = Path(run_dir)
        self.callback, self.preview_callback = callback, preview_callback
        self.preview_captions = list(preview_captions or [])
        self.stop_event = stop_event or threading.Event()
        self.step = start_step
        self.history: list[StepInfo] = list(history or [])
        self.warnings: list[str] = []
        self._warned_inactive = False
        self.accelerator = _make_accelerator(cfg.mixed_precision)
        self.device = self.accelerator.device
        model.to(self.device)
        self.params = [p for p in model.trainable_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self._raw_unet = model.unet
        model.unet, self.optimizer = self.accelerator.prepare(model.unet, self.optimizer)
        self.ema = None
        if cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)
        self.null_tokens, self.null_mask = (x.cpu() for x in model.null_context(1))
        self.num_timesteps = model.noise_scheduler.config.num_train_timesteps

    # ----------------------------------------------------------------------------------- loop
    def run_loop(self) -> TrainResult:
        """Train until ``cfg.max_steps`` or until ``stop_event`` is set; checkpoint on the way out."""
        last_ckpt = None
        t_start, steps_timed = time.perf_counter(), 0
        try:
            while self.step < self.cfg.max_steps and not self.stop_event.is_set():
                terms, psi_stats = self.run_step()
                self.step += 1
                steps_timed += 1
                sec = (time.perf_counter() - t_start) / steps_timed
                info = StepInfo(
                    step=self.step, max_steps=self.cfg.max_steps, terms=terms, lr=self._lr(self.step - 1),
                    psi_mean=psi_stats[0], psi_active=psi_stats[1], seconds_per_step=sec,
                    eta_seconds=sec * (self.cfg.max_steps - self.step), pog_share=pog_share(terms),
                )
                self.history.append(info)
                self._check_pogdiff_active()
                if self.cfg.log_every and self.step % self.cfg.log_every == 0:
                    self._log(info)
                if self.callback:
                    self.callback(info)
                if self._due(self.cfg.sample_every) and self.preview_callback and self.preview_captions:
                    self._preview()
                if self._due(self.cfg.checkpoint_every) and self.step < self.cfg.max_steps:
                    last_ckpt = self.save()
            stopped = self.step < self.cfg.max_steps
            if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:06d}"):
                last_ckpt = self.save()
        finally:
            self.model.unet = self._raw_unet
        return TrainResult(self.run_dir, last_ckpt, self.step, stopped, self.history, self.warnings)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _lr(self, step: int) -> float:
        """Linear warm-up, then constant: a pure function of the step (exact resumes)."""
        warm = max(1, self.cfg.warmup_steps)
        return self.cfg.learning_rate * min(1.0, (step + 1) / warm)

    def generator(self, step: int) -> torch.Generator:
        seed = (self.cfg.seed * _SEED_STRIDE + step) * 8 + self.accelerator.process_index
        return torch.Generator().manual_seed(seed)

    # ----------------------------------------------------------------------------------- step
    def run_step(self) -> tuple[dict[str, float], tuple[float, float]]:
        g = self.generator(self.step)
        batch = self.sample_batch(g)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        with self.accelerator.autocast():
            terms, psi_stats = self.forward_backward(batch, g)
        self.optimize()
        return {k: float(v.detach().float().mean()) for k, v in terms.items()}, psi_stats

    def sample_batch(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw rows, timesteps, noise and caption dropout for one step from ``g``."""
        n, b = len(self.data), self.cfg.batch_size
        if uses_balanced_sampling(self.cfg):
            rows = self._balanced_rows(b, g)
        elif b <= n:
            rows = torch.randperm(n, generator=g)[:b]
        else:
            rows = torch.randint(0, n, (b,), generator=g)
        x0 = self.data.x0[rows]
        t = torch.randint(0, self.num_timesteps, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        drop = torch.rand(b, generator=g) < self.cfg.caption_dropout
        return {"rows": rows, "x0": x0, "t": t, "eps": eps, "drop": drop}

    def _balanced_rows(self, b: int, g: torch.Generator) -> torch.Tensor:
        """Class-balanced draw: a class uniformly, then a row of that class uniformly."""
        classes = torch.randint(0, len(self.data.class_rows), (b,), generator=g)
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

    def forward_backward(self, batch: dict[str, torch.Tensor], g: torch.Generator):
        """One forward/backward pass of the configured method; returns (terms, psi stats)."""
        dev = self.device
        x0, eps, t = batch["x0"].to(dev), batch["eps"].to(dev), batch["t"].to(dev)
        x_t = self.model.noise_scheduler.add_noise(x0, eps, t)
        tokens, mask = self.context(batch["rows"], batch["drop"])
        eps_pred = self.model.predict_eps(x_t, t, tokens, mask)
        psi_stats = (0.0, 0.0)
        method = self.cfg.method
        if method == "pogdiff":
            terms, psi_stats = self._pogdiff_terms(batch, x_t, t, eps_pred, eps, g)
        elif method == "cbdm":
            rows_b = self._balanced_rows(len(t), g)
            tokens_b, mask_b = self.context(rows_b)
            eps_pred_b = self.model.predict_eps(x_t, t, tokens_b, mask_b)
            terms = losses.cbdm_loss(eps_pred, eps, eps_pred_b, t, self.num_timesteps, tau=self.cfg.cbdm_tau)
        else:
            terms = losses.mse_loss(eps_pred, eps)
        self.accelerator.backward(terms["loss"].mean())
        return terms, psi_stats

    def _pogdiff_terms(self, batch, x_t, t, eps_pred, eps, g):
        """PoGDiff: the neighbour forward pass runs under no_grad, only for rows with psi above threshold."""
        table = self.data.table
        rows = batch["rows"].numpy()
        slots = table.draw_slots(rows, g)
        nb = table.indices[rows, slots]
        psi = torch.as_tensor(table.psi[rows, slots], dtype=torch.float32)
        if self.cfg.psi.schedule == "gaussian":
            delta2 = torch.as_tensor(table.delta2[rows, slots], dtype=torch.float32)
            psi = psi * gaussian_psi_factor(t, delta2, self.model.noise_scheduler.betas)
        psi[batch["drop"]] = 0.0  # an unconditional row has no caption to borrow through
        active = psi > self.cfg.psi.psi_threshold
        psi = torch.where(active, psi, torch.zeros_like(psi))
        eps_nb = torch.zeros_like(eps_pred)
        if bool(active.any()):
            idx = torch.nonzero(active).flatten().to(self.device)
            tokens_nb, mask_nb = self.context(torch.as_tensor(nb)[active])
            with torch.no_grad():
                eps_nb[idx] = self.model.predict_eps(x_t[idx], t[idx], tokens_nb, mask_nb).to(eps_nb.dtype)
        terms = losses.pogdiff_loss(eps_pred, eps, eps_nb, psi.to(self.device))
        return terms, (float(psi.mean()), float(active.float().mean()))

    def _check_pogdiff_active(self) -> None:
        """Warn once, in the log and in ``self.warnings``, when the PoG term stays negligible."""
        if self.cfg.method != "pogdiff" or self._warned_inactive:
            return
        recent = self.history[-max(INACTIVE_MIN_STEPS, 50):]
        message = pogdiff_inactive_warning([h.pog_share for h in recent], [h.psi_mean for h in recent])
        if message:
            self._warned_inactive = True
            self.warnings.append(message)
            logger.warning(message)

    def _log(self, info: StepInfo) -> None:
        if self.cfg.method == "pogdiff":
            logger.info("step %d/%d loss %.4f psi %.3f active %.0f%% PoG share %.2f%% (%.3fs/step)",
                        info.step, info.max_steps, info.terms["loss"], info.psi_mean, 100 * info.psi_active,
                        100 * info.pog_share, info.seconds_per_step)
        else:
            logger.info("step %d/%d loss %.4f (%.3fs/step)", info.step, info.max_steps, info.terms["loss"],
                        info.seconds_per_step)

    def optimize(self) -> None:
        if self.cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)

    # ------------------------------------------------------------------------------ outputs
    def save(self) -> Path:
        self.accelerator.wait_for_everyone()
        unet = self.model.unet
        self.model.unet = self._raw_unet
        try:
            ema_unet = self._ema_unet()
            history = [dataclasses.asdict(h) for h in self.history]
            path = checkpoints.save_checkpoint(
                self.run_dir, self.step, self.model, train_cfg=self.cfg, optimizer=self.optimizer,
                ema_unet=ema_unet, extra={"history": history},
            )
        finally:
            self.model.unet = unet
        logger.info("saved %s", path)
        return path

    def _ema_unet(self):
        if self.ema is None:
            return None
        import copy

        ema_unet = copy.deepcopy(self._raw_unet)
        params = [p for p in ema_unet.parameters() if p.requires_grad]
        self.ema.copy_to(params)
        return ema_unet

    def _preview(self) -> None:
        from pogdiff.sampling import generate

        unet = self.model.unet
        self.model.unet = self._raw_unet
        was_training = self._raw_unet.training
        self._raw_unet.eval()
        try:
            cfg = SampleConfig(steps=PREVIEW_SAMPLE_STEPS)
            images = generate(self.model, self.preview_captions, list(range(len(self.preview_captions))), cfg)
        finally:
            self._raw_unet.train(was_training)
            self.model.unet = unet
        self.preview_callback(self.step, images, list(self.preview_captions))


def build_model(model_cfg: ModelConfig, *, base_checkpoint: str | Path | None = None, seed: int = 0):
    """The model to fine-tune: a base checkpoint, a Stable Diffusion pipeline, or a fresh tiny UNet."""
    from pogdiff import models

    if base_checkpoint:
        return checkpoints.load_model(base_checkpoint)
    if model_cfg.preset == "sd15":
        dtype = torch.float32
        return models.load_stable_diffusion(model_cfg, dtype=dtype)
    return models.build_tiny(model_cfg, seed=seed)


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

    With ``resume`` and an existing checkpoint in ``run_dir``, training continues from it and the
    loss curve matches an uninterrupted run with the same seed.
    """
    check_train_config(train_cfg, len(dataset))
    size = dataset.images.shape[1]
    if size != model_cfg.resolution:
        raise ValueError(
            f"images are {size}x{size} but the model expects {model_cfg.resolution}x{model_cfg.resolution}: "
            f"load the set with DataConfig(resolution={model_cfg.resolution})"
        )
    run_dir = Path(run_dir)
    latest = checkpoints.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        model = checkpoints.load_model(latest)
        state_ckpt = latest
    else:
        model = build_model(model_cfg, base_checkpoint=base_checkpoint, seed=train_cfg.seed)
        state_ckpt = None
    data = prepare_data(dataset, model, train_cfg.psi, cache_dir=cache_dir, need_table=train_cfg.method == "pogdiff")
    trainer = Trainer(
        model, data, train_cfg, run_dir=run_dir, callback=callback, preview_callback=preview_callback,
        preview_captions=preview_captions, stop_event=stop_event,
    )
    if state_ckpt is not None:
        state = checkpoints.load_trainer_state(state_ckpt, trainer.optimizer)
        trainer.step = int(state["step"])
        trainer.history = [StepInfo(**h) for h in (state.get("extra") or {}).get("history", [])]
        logger.info("resumed from %s at step %d", state_ckpt, trainer.step)
    if trainer.step >= train_cfg.max_steps:
        return TrainResult(run_dir, latest, trainer.step, False, trainer.history)
    return trainer.run_loop()


# PoGDiff counts as inactive when the PoG term stays below this share of the loss.
INACTIVE_POG_SHARE = 0.01
INACTIVE_MIN_STEPS = 10  # judged over at least this many steps


def pog_share(terms: dict[str, float]) -> float:
    """The PoG term's share of the loss, ``pog / loss`` (0 without a PoG term)."""
    loss = terms.get("loss", 0.0)
    return float(terms.get("pog", 0.0) / loss) if loss > 0 else 0.0


def pogdiff_inactive_warning(pog_shares: Sequence[float], psi_means: Sequence[float]) -> str | None:
    """A plain-words warning when PoGDiff behaves like plain fine-tuning, else None.

    Judged on the mean PoG share of the loss over the given steps (at least
    ``INACTIVE_MIN_STEPS``): below ``INACTIVE_POG_SHARE`` the neighbour term changes the target
    too little to matter (README "Is PoGDiff doing anything?").

    :param pog_shares: per-step ``StepInfo.pog_share``.
    :param psi_means: per-step ``StepInfo.psi_mean``.
    """
    if len(pog_shares) < INACTIVE_MIN_STEPS:
        return None
    share = float(np.mean(pog_shares))
    if share >= INACTIVE_POG_SHARE:
        return None
    psi = float(np.mean(psi_means))
    return (
        f"PoGDiff is doing almost nothing on this data: the PoG term is {100 * share:.2f}% of the loss "
        f"(mean psi {psi:.3f}). The captions' neighbours predict what the captions themselves predict, so "
        "PoGDiff behaves like plain fine-tuning. Try neighbours from other classes (psi pool 'other_class'), "
        "a larger psi_max, or check that rare classes have at least 2 images; see README "
        "\"Is PoGDiff doing anything?\"."
    )


def loss_curve(history: Sequence[StepInfo], term: str = "loss") -> np.ndarray:
    """[S] float array of one loss term over the steps of a run."""
    return np.array([h.terms.get(term, math.nan) for h in history], dtype=np.float64)
