"""Sampling with DDIM / DPM-Solver and classifier-free guidance, one fixed seed per image.

Image ``i`` starts from noise drawn on the CPU from ``torch.Generator().manual_seed(seeds[i])``
and the samplers are deterministic (DDIM with eta = 0, DPM-Solver++), so the same
``(caption, seed)`` gives the same picture whatever else is in the batch.

Guidance: eps = eps(null) + w * (eps(y) - eps(null)) (Ho & Salimans, 2022), w = guidance_scale;
w = 1 skips the unconditional pass.
"""

from __future__ import annotations

import logging
import textwrap
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from pogdiff.config import SampleConfig
from pogdiff.model.models import DiffusionModel

logger = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "dpm")
PRECISIONS = ("fp32", "bf16")
LABEL_FONT_SIZE = 10
LABEL_LINE_HEIGHT = 12
LABEL_MAX_LINES = 3
LABEL_PAD = 2
GRID_GAP = 2


class GenerationStopped(RuntimeError):
    """Raised when ``stop_event`` is set; ``images`` holds the finished batches, uint8
    ``[M, H, W, 3]`` with ``M`` a multiple of the batch size (possibly 0)."""

    def __init__(self, images: np.ndarray) -> None:
        super().__init__(f"generation stopped after {len(images)} image(s)")
        self.images = images


def make_scheduler(model: DiffusionModel, name: str):
    """A fresh sampling scheduler on the model's training schedule ("ddim" or "dpm").

    Both see eps predictions (``DiffusionModel.predict_eps`` converts v-prediction) and use
    "trailing" timestep spacing, so the first step starts from t = T - 1.
    """
    config = model.noise_scheduler.config
    common = {"prediction_type": "epsilon", "timestep_spacing": "trailing"}
    # In pixel space x0 lives in [-1, 1]: clip the x0 estimate. Without it the first step from
    # t = T - 1 (alpha_bar ~ 0 on the cosine schedule) divides by ~0 and the sample blows up.
    pixel_space = model.vae is None
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=pixel_space, clip_sample_range=1.0, **common)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", thresholding=pixel_space, sample_max_value=1.0, **common
        )
    raise ValueError(f"unknown scheduler {name!r}; allowed values: {', '.join(SCHEDULERS)}")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """Noise ``[N, *shape]`` float32 on the CPU, row ``i`` from ``Generator().manual_seed(seeds[i])``."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[N, H, W, 3]``."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _check_inputs(captions: Sequence[str], seeds: Sequence[int], cfg: SampleConfig, batch_size: int) -> None:
    if len(seeds) != len(captions):
        raise ValueError(f"need one seed per caption: got {len(captions)} captions and {len(seeds)} seeds")
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; allowed values: {', '.join(SCHEDULERS)}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {cfg.guidance_scale}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; allowed values: {', '.join(PRECISIONS)}")


def _pad_tokens(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad ``tokens`` ``[N, L, C]`` with zeros and ``mask`` ``[N, L]`` with False to ``length``."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    tokens = torch.nn.functional.pad(tokens, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(mask, (0, extra), value=False)
    return tokens, mask


def _guided_eps(model: DiffusionModel, x: Tensor, t: Tensor, cond: tuple[Tensor, Tensor],
                null: tuple[Tensor, Tensor] | None, scale: float) -> Tensor:
    """eps(y) or the guided eps(null) + w (eps(y) - eps(null)); ``x`` ``[B, *latent_shape]``."""
    if null is None:
        return model.predict_eps(x, t.expand(len(x)), *cond)
    both = torch.cat([x, x])
    ctx, mask = torch.cat([null[0], cond[0]]), torch.cat([null[1], cond[1]])
    eps_null, eps_cond = model.predict_eps(both, t.expand(len(both)), ctx, mask).float().chunk(2)
    return eps_null + scale * (eps_cond - eps_null)


def _sample_batch(model: DiffusionModel, noise: Tensor, cond: tuple[Tensor, Tensor],
                  null: tuple[Tensor, Tensor] | None, cfg: SampleConfig,
                  on_step: Callable[[], None]) -> Tensor:
    """Run the sampler from ``noise`` ``[B, *latent_shape]`` -> x0 ``[B, *latent_shape]``."""
    scheduler = make_scheduler(model, cfg.scheduler)  # multistep solvers keep per-run state
    scheduler.set_timesteps(cfg.steps, device=model.device)
    x = noise.to(model.device) * scheduler.init_noise_sigma
    device_type = torch.device(model.device).type
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            eps = _guided_eps(model, x_in, t, cond, null, cfg.guidance_scale)
        x = scheduler.step(eps.float(), t, x).prev_sample
        on_step()
    return x


@torch.no_grad()
def generate(
    model: DiffusionModel,
    captions: Sequence[str],
    seeds: Sequence[int],
    cfg: SampleConfig,
    *,
    batch_size: int = 64,
    callback: Callable[[int, int], None] | None = None,
    stop_event: threading.Event | None = None,
) -> np.ndarray:
    """Images for ``captions`` with one seed each -> uint8 ``[N, H, W, 3]``.

    ``callback(done_steps, total_steps)`` runs after every denoising step (total over all
    batches). ``stop_event`` is checked before each step; when set, :class:`GenerationStopped`
    is raised carrying the images of the batches already finished.
    """
    _check_inputs(captions, seeds, cfg, batch_size)
    n = len(captions)
    if n == 0:
        res = model.config.resolution
        return np.zeros((0, res, res, 3), np.uint8)
    tokens, mask = model.encode_captions(list(captions))  # [N, L, C], [N, L]
    use_cfg = cfg.guidance_scale != 1.0
    if use_cfg:
        null_tokens, null_mask = model.null_context(1)
        length = max(tokens.shape[1], null_tokens.shape[1])
        tokens, mask = _pad_tokens(tokens, mask, length)
        null_tokens, null_mask = _pad_tokens(null_tokens, null_mask, length)
    noise = initial_noise(seeds, model.latent_shape)  # [N, *latent_shape], CPU
    n_batches = -(-n // batch_size)
    total = n_batches * cfg.steps
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total)

    was_training = model.unet.training
    model.unet.eval()
    out: list[np.ndarray] = []
    try:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            b = len(noise[sl])
            cond = (tokens[sl], mask[sl])
            null = (null_tokens.expand(b, -1, -1), null_mask.expand(b, -1)) if use_cfg else None
            stop_check = _stopper(stop_event, out, on_step)
            x0 = _sample_batch(model, noise[sl], cond, null, cfg, stop_check)
            out.append(to_uint8(model.decode(x0)))
    finally:
        model.unet.train(was_training)
    logger.debug("generated %d image(s) in %d batch(es) of <= %d", n, n_batches, batch_size)
    return np.concatenate(out)


def _stopper(stop_event: threading.Event | None, finished: list[np.ndarray],
             on_step: Callable[[], None]) -> Callable[[], None]:
    """Wrap ``on_step`` so that a set ``stop_event`` raises between steps."""

    def step() -> None:
        on_step()
        if stop_event is not None and stop_event.is_set():
            raise GenerationStopped(_concat(finished))

    if stop_event is not None and stop_event.is_set():
        raise GenerationStopped(_concat(finished))
    return step


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)


def _wrap_label(draw: ImageDraw.ImageDraw, label: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``label`` to ``width`` pixels, at most LABEL_MAX_LINES lines."""
    chars = max(1, int(width / max(1.0, draw.textlength("n", font=font))))
    lines = textwrap.wrap(label, width=chars) or [""]
    if len(lines) > LABEL_MAX_LINES:
        lines = lines[:LABEL_MAX_LINES]
        lines[-1] = lines[-1][: max(0, chars - 1)] + "…"
    while any(draw.textlength(line, font=font) > width for line in lines) and chars > 1:
        chars -= 1
        lines = textwrap.wrap(label, width=chars)[:LABEL_MAX_LINES]
    return lines


def image_grid(images: np.ndarray, ncols: int, *, labels: Sequence[str] | None = None,
               scale: int = 1) -> Image.Image:
    """uint8 ``[N, H, W, 3]`` -> one RGB picture with ``ncols`` columns, tiles upscaled by
    ``scale`` (nearest) and ``GRID_GAP`` white pixels apart; ``labels[i]`` under tile ``i``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    if ncols < 1 or scale < 1:
        raise ValueError(f"ncols and scale must be >= 1, got ncols={ncols}, scale={scale}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"need one label per image: got {len(labels)} labels and {len(images)} images")
    n, h, w = images.shape[0], images.shape[1] * scale, images.shape[2] * scale
    ncols = min(ncols, max(n, 1))
    nrows = -(-n // ncols)
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap_label(probe, str(lab), font, w) for lab in labels] if labels is not None else []
    band = (max(len(lines) for lines in wrapped) * LABEL_LINE_HEIGHT + LABEL_PAD) if wrapped else 0
    cell_h, cell_w = h + band + GRID_GAP, w + GRID_GAP
    grid = Image.new("RGB", (max(1, ncols * cell_w - GRID_GAP), max(1, nrows * cell_h - GRID_GAP)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % ncols) * cell_w, (i // ncols) * cell_h
        tile = Image.fromarray(img)
        if scale > 1:
            tile = tile.resize((w, h), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        for k, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + h + LABEL_PAD // 2 + k * LABEL_LINE_HEIGHT), line, fill="black", font=font)
    return grid
