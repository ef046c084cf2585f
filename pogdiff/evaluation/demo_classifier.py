"""Frozen image classifiers that score generations (README "Results").

- :class:`Evaluator`: a small CNN trained on renders of the procedural identity generator
  (:mod:`pogdiff.data.identities`), so its ground truth is unlimited. It names the identity in
  an image and reads the attributes of :data:`~pogdiff.data.identities.ATTRIBUTE_HEADS`; its
  L2-normalised 128-d feature layer is the feature space of the metrics in
  :mod:`pogdiff.evaluation.metrics` for the embedded demo set.

A user's own classes are judged by :mod:`pogdiff.evaluation.user_judge` instead (a classifier fitted on their
images, with its held-out reliability).

Checkpoints are ``evaluator.safetensors`` (weights) plus ``evaluator.json`` (architecture,
training config, demo spec, measured accuracies); nothing is loaded with pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.data.demo import SPLITS, DemoSpec, demo_identities, render_set, split_seed
from pogdiff.data.identities import ATTRIBUTE_HEADS, attribute_labels

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "evaluator.safetensors"
CONFIG_FILE = "evaluator.json"
FORMAT_VERSION = 1
INFER_BATCH = 256
# Seed streams of the evaluator's own renders; the demo splits use SeedSequence([seed, 1..3]).
_TRAIN_STREAM, _VAL_STREAM = 101, 102
# Augmentation strengths (images in [-1, 1]).
AUG_SHIFT_PX = 2.0  # max translation, pixels of a 32-px image
AUG_SCALE = 0.06  # max relative zoom in / out
AUG_NOISE_STD = 0.08  # max per-image Gaussian noise std
AUG_BLUR_P = 0.5  # share of images blurred, with a random mix towards a 3x3 Gaussian blur
AUG_COLOUR = 0.1  # max relative brightness / contrast change


def _images_to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, size, size]`` in [-1, 1] (antialiased resize)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if size is not None and x.shape[-2:] != (size, size) and len(x):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class Evaluator(nn.Module):
    """Identity + attribute classifier for ``resolution``-px RGB images.

    Four conv blocks (3x3 conv, BatchNorm, SiLU; 2x2 max-pool after the first three) with
    ``width, 2*width, 4*width, 4*width`` channels, global average pooling, a linear
    ``feature_dim`` feature layer, and linear heads on it: ``identity`` (one logit per subject)
    and one head per entry of ``attribute_heads`` (``{name: n_classes}``).
    """

    def __init__(
        self,
        *,
        subjects: Sequence[str],
        attribute_heads: dict[str, int] | None = None,
        resolution: int = 32,
        width: int = 32,
        feature_dim: int = 128,
    ):
        super().__init__()
        if len(subjects) < 2 or len(set(subjects)) != len(subjects):
            raise ValueError(f"subjects must be >= 2 distinct names, got {list(subjects)[:5]}")
        self.subjects = list(subjects)
        self.attribute_heads = dict(ATTRIBUTE_HEADS if attribute_heads is None else attribute_heads)
        self.resolution = resolution
        self.width = width
        self.feature_dim = feature_dim
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]
            if i < len(chans) - 2:
                blocks.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*blocks)
        self.feature = nn.Linear(chans[-1], feature_dim)
        self.heads = nn.ModuleDict({"identity": nn.Linear(feature_dim, len(self.subjects))})
        for name, n in self.attribute_heads.items():
            self.heads[name] = nn.Linear(feature_dim, n)

    def arch(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able (stored in ``evaluator.json``)."""
        return {"subjects": self.subjects, "attribute_heads": self.attribute_heads,
                "resolution": self.resolution, "width": self.width, "feature_dim": self.feature_dim}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """:param x: ``[B, 3, H, W]`` in [-1, 1]. :return: ``{"features": [B, F], head: [B, n_head]}``."""
        h = self.body(x).mean(dim=(2, 3))  # [B, C]
        feats = self.feature(h)  # [B, F]
        out = {"features": feats}
        for name, head in self.heads.items():
            out[name] = head(feats)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward_batched(self, x: torch.Tensor, batch_size: int = INFER_BATCH) -> dict[str, torch.Tensor]:
        """Eval-mode forward of ``x [N, 3, H, W]`` in batches; outputs on the CPU, training mode restored."""
        was_training = self.training
        self.eval()
        try:
            outs = [self(x[i:i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)]
            if not outs:
                outs = [self(x.to(self.device))]
        finally:
            self.train(was_training)
        return {k: torch.cat([o[k] for o in outs]).float().cpu() for k in outs[0]}

    def _run(self, images: np.ndarray, batch_size: int = INFER_BATCH) -> dict[str, torch.Tensor]:
        return self.forward_batched(_images_to_tensor(images, self.resolution), batch_size)

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, feature_dim]``, each row L2-normalised.

        Images of another size are resized (antialiased bilinear) to ``resolution`` first.
        """
        return F.normalize(self._run(images)["features"], dim=1).numpy()

    def predict(self, images: np.ndarray) -> dict[str, Any]:
        """Classify uint8 ``[N, H, W, 3]`` images.

        :return: ``{"subject": list[str] [N], "subject_prob": float32 [N] (softmax probability
            of the predicted subject), "attrs": {name: int64 [N]}, "features": float32 [N, F]
            (as :meth:`features`)}``.
        """
        out = self._run(images)
        prob, idx = out["identity"].softmax(dim=1).max(dim=1)
        return {
            "subject": [self.subjects[i] for i in idx.tolist()],
            "subject_prob": prob.numpy(),
            "attrs": {name: out[name].argmax(dim=1).numpy() for name in self.attribute_heads},
            "features": F.normalize(out["features"], dim=1).numpy(),
        }


@dataclass
class EvaluatorConfig:
    """Training of the :class:`Evaluator` on fresh generator renders."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    resolution: int = 32
    augment: bool = True  # small shifts / zoom, noise, blur, brightness-contrast: robust to generations
    attr_loss_weight: float = 1.0  # weight of each attribute head's cross-entropy
    n_val_per_identity: int = 20
    width: int = 32
    feature_dim: int = 128


def _fresh_seed(seed: int, stream: int, index: int, reserved: set[int]) -> int:
    """A render seed for ``(seed, stream, index)`` that is never one of ``reserved``."""
    for attempt in range(100):
        s = int(np.random.SeedSequence([seed, stream, index, attempt]).generate_state(1)[0])
        if s not in reserved:
            return s
    raise RuntimeError("could not draw a seed outside the reserved set")


def _batch_counts(n_ids: int, batch_size: int, rng: np.random.Generator) -> list[int]:
    """Balanced images per identity summing to ``batch_size`` (the remainder to random ones)."""
    counts = np.full(n_ids, batch_size // n_ids)
    counts[rng.choice(n_ids, size=batch_size % n_ids, replace=False)] += 1
    return counts.tolist()


def _labels(rendered, subjects: list[str], heads: dict[str, int]) -> dict[str, torch.Tensor]:
    index = {s: i for i, s in enumerate(subjects)}
    labels = [attribute_labels(a) for a in rendered.attributes]
    out = {"identity": torch.tensor([index[s] for s in rendered.subjects])}
    for name in heads:
        out[name] = torch.tensor([lab[name] for lab in labels])
    return out


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random per-image degradations of ``x [B, 3, H, W]`` in [-1, 1], same shape out.

    A translation up to ``AUG_SHIFT_PX`` (scaled to H) and a zoom up to ``AUG_SCALE`` (bilinear,
    border padding), a mix towards a 3x3 Gaussian blur for a share ``AUG_BLUR_P`` of images,
    brightness / contrast changes up to ``AUG_COLOUR`` and Gaussian noise with a per-image std
    up to ``AUG_NOISE_STD``; clamped to [-1, 1].
    """
    b, _, h, _ = x.shape

    def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1]
        return torch.rand(*shape, generator=generator) * 2 - 1

    scale = 1.0 + AUG_SCALE * u(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = u(b, 2) * (2 * AUG_SHIFT_PX / h)  # normalised coordinates span 2 per image
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = (torch.rand(b, generator=generator) < AUG_BLUR_P).float() * torch.rand(b, generator=generator)
    x = x + mix.view(b, 1, 1, 1) * (blurred - x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1.0 + AUG_COLOUR * u(b).view(b, 1, 1, 1)
    brightness = AUG_COLOUR * u(b).view(b, 1, 1, 1)
    x = (x - mean) * contrast + mean + brightness
    noise_std = AUG_NOISE_STD * torch.rand(b, generator=generator).view(b, 1, 1, 1)
    x = x + noise_std * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


def _lr_factor(step: int, cfg: EvaluatorConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def measure(model: Evaluator, rendered, *, augmented: torch.Generator | None = None) -> dict[str, float]:
    """Accuracy of every head on a rendered set: ``{"identity": acc, <attribute>: acc, ...}``.

    With ``augmented`` (a generator), the images first go through :func:`augment`.
    """
    labels = _labels(rendered, model.subjects, model.attribute_heads)
    x = _images_to_tensor(rendered.images, model.resolution)
    if augmented is not None:
        x = augment(x, augmented)
    out = model.forward_batched(x)
    return {name: float((out[name].argmax(1) == labels[name]).float().mean()) for name in labels}


def train_evaluator(
    spec: DemoSpec,
    cfg: EvaluatorConfig = EvaluatorConfig(),
    out_dir: str | Path | None = None,
    *,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train an :class:`Evaluator` on the demo spec's fine-tuning identities and save it.

    Every step renders a fresh, class-balanced batch of ``cfg.batch_size`` images with its own
    seed (never a demo split's seed, so the on-disk eval images are never trained on), optionally
    augments it, and minimises ``CE(identity) + attr_loss_weight * sum_a CE(a)`` with AdamW and a
    warmup + cosine learning rate. Measured afterwards, without augmentation unless named:

    - ``val``: a fresh render of ``n_val_per_identity`` images per identity;
    - ``val_augmented``: the same images through :func:`augment` (robustness proxy);
    - ``eval_split``: the demo set's on-disk ``eval`` split (same identities, counts and seed).

    :param callback: ``callback(step, {"loss": ..., "identity_acc": ...})`` after every step.
    :param progress: show a tqdm bar.
    :return: ``{"steps", "wall_seconds", "final_loss", "accuracy": {split: {head: acc}}}``;
        also written, with the config, the spec and the architecture, to
        ``out_dir/evaluator.json`` next to ``out_dir/evaluator.safetensors`` when ``out_dir`` is set.
    """
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {cfg.steps} and {cfg.batch_size}")
    identities = demo_identities(spec)
    subjects = [ident.name for ident in identities]
    reserved = {split_seed(spec.seed, split) for split in SPLITS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Evaluator(subjects=subjects, resolution=cfg.resolution, width=cfg.width,
                          feature_dim=cfg.feature_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    count_rng = np.random.default_rng([cfg.seed, _TRAIN_STREAM])
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="evaluator", unit="step")
    t0 = time.perf_counter()
    model.train()
    loss_value = math.nan
    for step in steps:
        seed = _fresh_seed(cfg.seed, _TRAIN_STREAM, step, reserved)
        batch = render_set(identities, _batch_counts(len(identities), cfg.batch_size, count_rng), seed,
                           cfg.resolution)
        labels = _labels(batch, subjects, model.attribute_heads)
        x = _images_to_tensor(batch.images, cfg.resolution)
        if cfg.augment:
            x = augment(x, aug_gen)
        out = model(x.to(device))
        id_loss = F.cross_entropy(out["identity"], labels["identity"].to(device))
        attr_loss = sum(F.cross_entropy(out[n], labels[n].to(device)) for n in model.attribute_heads)
        loss = id_loss + cfg.attr_loss_weight * attr_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if callback is not None:
            acc = float((out["identity"].argmax(1).cpu() == labels["identity"]).float().mean())
            callback(step, {"loss": loss_value, "identity_acc": acc})
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("evaluator step %d/%d loss %.4f", step + 1, cfg.steps, loss_value)
    wall = time.perf_counter() - t0
    model.eval()

    val = render_set(identities, cfg.n_val_per_identity, _fresh_seed(cfg.seed, _VAL_STREAM, 0, reserved),
                     cfg.resolution)
    eval_split = render_set(identities, spec.n_eval_per_identity, split_seed(spec.seed, "eval"), spec.resolution)
    accuracy = {
        "val": measure(model, val),
        "val_augmented": measure(model, val, augmented=torch.Generator().manual_seed(cfg.seed + 1)),
        "eval_split": measure(model, eval_split),
    }
    result = {"steps": cfg.steps, "wall_seconds": round(wall, 1), "final_loss": loss_value, "accuracy": accuracy}
    logger.info("evaluator trained in %.0fs: %s", wall, json.dumps(accuracy))
    if out_dir is not None:
        save_evaluator(model, out_dir, extra={"config": dataclasses.asdict(cfg), "spec": spec.to_json(),
                                              "metrics": result})
    return result


def save_evaluator(model: Evaluator, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``evaluator.safetensors`` and ``evaluator.json`` (architecture + ``extra``) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "arch": model.arch(), **(extra or {})}
    tmp_w, tmp_j = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_w))
    tmp_j.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_j, out / CONFIG_FILE)
    return out


def load_evaluator(path_or_dir: str | Path, *, device: str = "cpu") -> Evaluator:
    """Load an :class:`Evaluator` in eval mode from its folder (or either of its two files)."""
    path = Path(path_or_dir)
    folder = path if path.is_dir() else path.parent
    meta_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no evaluator at {folder}: need {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    model = Evaluator(**meta["arch"])
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.to(device).eval()
