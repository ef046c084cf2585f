"""One preparation path: a loaded data set and a model -> what training and the views need.

README "Preparation". For a data set (``images`` uint8 ``[N, H, W, 3]`` at the model's
resolution, ``captions``, ``subjects``) and a model, :func:`prepare_data` computes once:

- the caption embeddings of the model's own caption encoder (MiniLM for the tiny preset, CLIP for
  Stable Diffusion), cached on disk by content hash (:class:`pogdiff.model.text.CachedEncoder`);
- ``x0``, the images in diffusion space (pixels in [-1, 1], or VAE latents cached on disk by a
  hash of the pixels and the VAE weights);
- the image features behind ``s_img`` (of the pixels for pixel models, of the latents for latent
  models);
- the neighbour graph and psi table (cached on disk by a hash of its inputs).

Training, the Neighbours tab and the CLI all call it, so the psi a user inspects is the psi the
run trains with. The Neighbours tab passes :class:`EncoderParts` (the caption encoder and VAE of
the chosen preset, no UNet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pogdiff.config import PsiConfig
from pogdiff.method.neighbours import NeighbourTable, build_neighbour_table, image_features
from pogdiff.model.text import CachedEncoder, TextEmbeddings

logger = logging.getLogger(__name__)

TABLE_CACHE_VERSION = 1  # part of the table cache key; bump when build_neighbour_table changes


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
    image_feats: np.ndarray | None = None  # [N, F] the features behind s_img (similarity_features)

    def __post_init__(self) -> None:
        n = self.x0.shape[0]
        sizes = {"text": len(self.text), "captions": len(self.captions), "subjects": len(self.subjects)}
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(f"TrainData: x0 has {n} rows but {wrong} differ; every field needs one entry per row")
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
    if model.vae is not None:
        # The VAE returns channels-last latents; cached ones load contiguous. One layout for both,
        # or CPU convolutions round differently and a run reading the cache drifts by a few ulp.
        x0 = x0.contiguous()
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

    The one preparation path of training, the Neighbours tab and the CLI (README "Preparation").

    :param model: anything with the model's ``text_encoder``, ``vae`` (None for pixel models),
        ``encode_images`` and ``device``: a :class:`pogdiff.model.models.DiffusionModel`, or the
        :class:`EncoderParts` of one (no UNet) for views.
    :param dataset: an ``ImageTextSet`` (``images`` uint8 [N x H x W x 3], ``captions``, ``subjects``).
    """
    captions = list(dataset.captions)
    subjects = list(dataset.subjects)
    if len(captions) == 0:
        raise ValueError("the dataset is empty: load at least two images with captions before training")
    text = encode_captions(model.text_encoder, captions, cache_dir=cache_dir)
    x0 = encode_dataset_images(model, dataset.images, cache_dir=cache_dir)
    classes = sorted(set(subjects))
    index = {c: i for i, c in enumerate(classes)}
    class_ids = torch.tensor([index[s] for s in subjects], dtype=torch.long)
    feats = similarity_features(dataset.images, x0, latent=model.vae is not None)
    table = None
    if need_table and len(captions) > 1:
        table = neighbour_table(text.pooled.numpy(), feats, psi_cfg, subjects, clean=x0, cache_dir=cache_dir)
    return TrainData(x0=x0, text=text, captions=captions, subjects=subjects, class_ids=class_ids, table=table,
                     image_feats=feats)




def encode_captions(encoder, captions: list[str], *, cache_dir: str | Path | None = None) -> TextEmbeddings:
    """Caption embeddings on CPU, read from / written to ``cache_dir`` by content hash when given."""
    enc = CachedEncoder(encoder, cache_dir) if cache_dir else encoder
    return enc.encode(captions).to("cpu")


def similarity_features(images: np.ndarray, x0: torch.Tensor, *, latent: bool) -> np.ndarray:
    """The image features behind ``s_img``: of the pixels (pixel models) or the latents (VAE models)."""
    return np.asarray(image_features(x0 if latent else images), dtype=np.float32)


def _table_key(pooled: np.ndarray, feats: np.ndarray | None, psi: PsiConfig, subjects: list[str],
               clean: torch.Tensor | None) -> str:
    h = hashlib.sha256(json.dumps({"v": TABLE_CACHE_VERSION, "psi": dataclasses.asdict(psi)}, sort_keys=True).encode())
    for arr in (pooled, feats, None if clean is None else clean.numpy()):
        h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(subjects).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


TABLE_FIELDS = ("indices", "s_txt", "s_img", "w_density", "psi", "probs", "delta2")


def neighbour_table(pooled: np.ndarray, feats: np.ndarray | None, psi: PsiConfig, subjects: list[str], *,
                    clean: torch.Tensor | None = None, cache_dir: str | Path | None = None) -> NeighbourTable:
    """The neighbour table for caption vectors ``pooled`` (k capped at N - 1), from ``cache_dir``
    when an identical one was built before (same vectors, features, classes and PsiConfig)."""
    psi = dataclasses.replace(psi, k=max(1, min(psi.k, len(pooled) - 1)))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"neighbours-{_table_key(pooled, feats, psi, subjects, clean)}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {f: z[f] for f in TABLE_FIELDS if f in z.files}
                return NeighbourTable(**arrays, config=psi)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring the unreadable neighbour table cache %s: %s", path.name, exc)
    table = build_neighbour_table(pooled, feats, psi, classes=subjects, clean=clean)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **{f: getattr(table, f) for f in TABLE_FIELDS if getattr(table, f) is not None})
        os.replace(tmp, path)
    return table


@dataclass
class EncoderParts:
    """What preparation needs of a model, without its UNet: the caption encoder and the VAE."""

    text_encoder: Any
    vae: Any = None
    encode: Any = None  # the model's encode_images, for latent models
    device: torch.device | str = "cpu"

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() if self.vae is None else self.encode(images)


def encoder_parts(model_cfg, *, device: str = "cpu") -> EncoderParts:
    """The caption encoder (and VAE) of a preset, as training will use them.

    The tiny preset: its MiniLM encoder (shipped in a package, no download). Stable Diffusion: the
    whole pipeline is loaded (its CLIP text encoder and VAE are what count) from the local
    Hugging Face cache or the Hub.
    """
    from pogdiff.model import models

    if model_cfg.preset == "tiny":
        return EncoderParts(text_encoder=models.default_text_encoder(model_cfg), device=device)
    model = models.load_stable_diffusion(model_cfg, device=device)
    return EncoderParts(text_encoder=model.text_encoder, vae=model.vae, encode=model.encode_images,
                        device=model.device)
