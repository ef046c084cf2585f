"""Neighbour graph and psi table (README "The method"; BENCHMARKS.md "Speed").

Computed once per dataset: one FAISS search over the L2-normalised caption vectors gives the
k nearest captions of every sample; with density weights and image / caption similarities it
becomes the per-pair relative precision

    psi_ij = psi_max * w_density(i) * s_img(i, j) * s_txt(i, j)

that :func:`pogdiff.method.losses.pogdiff_loss` consumes. During training
:meth:`NeighbourTable.draw_slots` picks one of the k neighbours per sample (its column of the table's
``[N, k]`` arrays: the objective reads the neighbour's row and psi there).

Missing neighbours (k larger than the pool, or a class of one under the ``same_class`` pool) are
marked with index ``-1``; they have psi 0 and probability 0, so they never contribute.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pogdiff.config import POOLS, SAMPLING_MODES, SCHEDULES, PsiConfig
from pogdiff.method.knn import MISSING, KnnResult, KnnSearch, as_normalised, knn, knn_search, pad_to_k

logger = logging.getLogger(__name__)

# The other_class pool searches this many extra candidates per query (at most) before dropping
# the caption's own class, so a query from a large class still finds k other-class neighbours.
OTHER_CLASS_EXTRA = 256
# Kernel density: exact all-pairs sums up to this many vectors, kNN-truncated sums beyond.
DENSITY_EXACT_MAX = 20_000
DENSITY_KNN = 256
DENSITY_BLOCK = 2048
IMAGE_FEATURE_CHUNK = 256




# --------------------------------------------------------------------------------------------
# density weights and image features


def density_weights(
    *,
    classes: Sequence[str] | None,
    pooled: np.ndarray | None,
    gamma: float,
    bandwidth: float,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per-sample weight in [0, 1]: 1 for the rarest samples, small for the most frequent.

    With class labels: ``(n_min / n_c) ** gamma``. Without: an LDS-style inverse Gaussian-kernel
    density of the caption vectors, ``rho_i = sum_j exp(-d_ij^2 / (2 h^2))`` with the cosine
    distance ``d_ij = 1 - <y_i, y_j>`` (self included), then ``(min rho / rho_i) ** gamma``.
    Beyond ``DENSITY_EXACT_MAX`` vectors the sum runs over each vector's ``DENSITY_KNN`` nearest
    neighbours only (the kernel of farther vectors is negligible for small ``h``).

    :param classes: N labels, or None for free text.
    :param pooled: [N x D] L2-normalised caption vectors (needed when ``classes`` is None).
    :param gamma: exponent >= 0 (0 gives all ones).
    :param bandwidth: kernel bandwidth h > 0 in cosine distance.
    :param neighbours: optional ``(sims, idx)`` of a self-excluding caption search with at least
        ``DENSITY_KNN - 1`` columns, reused for the truncated sum instead of a second search.
    :return: float32 [N].
    """
    if gamma < 0:
        raise ValueError(f"density gamma must be >= 0, got {gamma}")
    if classes is not None:
        labels = list(classes)
        if pooled is not None and len(labels) != len(pooled):
            raise ValueError(f"got {len(labels)} classes for {len(pooled)} caption vectors")
        counts = Counter(labels)
        n_c = np.array([counts[c] for c in labels], dtype=np.float64)
        ratio = min(counts.values()) / n_c
    else:
        if pooled is None:
            raise ValueError("density_weights needs classes or pooled caption vectors")
        if bandwidth <= 0:
            raise ValueError(f"kde bandwidth must be > 0, got {bandwidth}")
        rho = _kernel_density(as_normalised("pooled", pooled), bandwidth, neighbours)
        ratio = rho.min() / rho
    return (ratio**gamma).astype(np.float32)


def _kernel_density(vectors: np.ndarray, bandwidth: float,
                    neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``rho_i = sum_j exp(-(1 - cos_ij)^2 / (2 h^2))``: [N, D] -> float64 [N].

    Beyond ``DENSITY_EXACT_MAX`` rows the sum runs over the row itself (kernel 1) and its
    ``DENSITY_KNN - 1`` nearest other rows, from ``neighbours`` (``(sims, idx)`` of a
    self-excluding search with at least that many columns) or from a :func:`knn` search.
    """
    n = vectors.shape[0]
    if n > DENSITY_EXACT_MAX:
        k = min(DENSITY_KNN, n) - 1
        if neighbours is None or neighbours[1].shape[1] < k:
            neighbours = knn(vectors, k)
        sims, idx = neighbours[0][:, :k], neighbours[1][:, :k]
        dist = 1.0 - np.where(idx >= 0, sims, -1.0).astype(np.float64)
        kernel = np.where(idx >= 0, np.exp(-(dist**2) / (2 * bandwidth**2)), 0.0)
        return 1.0 + kernel.sum(axis=1)
    rho = np.empty(n, dtype=np.float64)
    for start in range(0, n, DENSITY_BLOCK):
        cos = vectors[start : start + DENSITY_BLOCK].astype(np.float64) @ vectors.T.astype(np.float64)
        rho[start : start + DENSITY_BLOCK] = np.exp(-((1.0 - cos) ** 2) / (2 * bandwidth**2)).sum(axis=1)
    return rho


def image_features(images: np.ndarray | torch.Tensor, *, size: int = 8) -> np.ndarray:
    """Cheap image features for ``s_img``: area-downsample to ``size x size``, flatten, subtract
    the per-image mean, L2-normalise. Their cosine is the Pearson correlation of thumbnails, so
    it is invariant to brightness offset and contrast.

    :param images: uint8 [N x H x W x C] images (the on-disk convention), or float
        [N x C x h x w] images / VAE latents (the model convention; numpy or torch).
    :param size: thumbnail side.
    :return: float32 [N x C*size*size]; a constant image gives the zero vector (cosine 0).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] uint8 or [N, C, H, W] float, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    out = []
    for chunk in x.split(IMAGE_FEATURE_CHUNK):
        thumb = F.adaptive_avg_pool2d(chunk.float().cpu(), size)  # [B, C, size, size]
        flat = thumb.flatten(1)
        flat = flat - flat.mean(dim=1, keepdim=True)
        out.append(F.normalize(flat, dim=1))
    return torch.cat(out).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# the psi table


@dataclass
class NeighbourTable:
    """Per-sample neighbours and psi, computed once per dataset (README "The method").

    ``indices [N, k]`` int64 neighbour rows (never the row itself; -1 = empty slot),
    ``s_txt [N, k]`` / ``s_img [N, k]`` max(0, cosine) of caption vectors / image features,
    ``w_density [N]``, ``psi [N, k] = psi_max * w * s_img * s_txt`` (disabled factors are 1;
    0 on empty slots and for classes of one), ``probs [N, k]`` sampling probabilities (rows sum
    to 1), ``config`` the PsiConfig that built it.
    """

    indices: np.ndarray
    s_txt: np.ndarray
    s_img: np.ndarray
    w_density: np.ndarray
    psi: np.ndarray
    probs: np.ndarray
    config: PsiConfig
    delta2: np.ndarray | None = None  # [N, k] mean squared image differences; None when not measured

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def draw_slots(self, rows: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """The neighbour slot (column of the [N, k] arrays) drawn for each of ``rows`` [B] by ``probs``:
        int64 [B]. ``generator`` is a CPU ``torch.Generator``; the same state gives the same draw. A
        slot whose neighbour is -1 (none) has probability 0, so it is drawn only where psi is 0."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return np.empty(0, np.int64)
        probs = torch.from_numpy(np.ascontiguousarray(self.probs[rows], dtype=np.float64))
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).numpy()

    def informative(self, classes: Sequence[str], threshold: float) -> np.ndarray:
        """Per row: does it have a neighbour that can change its target? bool [N].

        A neighbour counts when its psi exceeds ``threshold`` and it shows another subject:
        a neighbour of the row's own subject is usually a rewording whose prediction equals the
        row's own (README "The method", what measurement taught us).
        """
        labels = np.asarray([str(c) for c in classes], dtype=object)
        safe = np.where(self.indices >= 0, self.indices, 0)
        other = (self.indices >= 0) & (labels[safe] != labels[:, None])
        return (psi_gate(self.psi, threshold) & other).any(axis=1)

def psi_gate(psi: np.ndarray | torch.Tensor, threshold: float):
    """Which rows run the neighbour pass: ``psi > threshold`` (README "The method"). A row at the
    threshold or below keeps the plain target; its target would move by at most
    ``threshold / (1 + threshold)`` of the way towards the neighbour's prediction."""
    return psi > threshold


def expected_shift(psi_t: torch.Tensor, t: torch.Tensor, delta2: torch.Tensor | None,
                   betas: torch.Tensor) -> torch.Tensor:
    """How far the PoG target moves a row, in eps units: ``psi_t / (1 + psi_t) * gap_t``.

    ``gap_t = sqrt(abar_t / (1 - abar_t) * delta2)`` is the RMS difference of the two eps targets
    that a clean image and its neighbour's (mean squared difference ``delta2``) give the same
    ``x_t``: the neighbour's prediction gap of a model that knew both images. Without ``delta2``
    (constant psi) every gap counts as 1. This is what a row's neighbour pass is worth
    (README "The method", the cost of the neighbour pass).

    :param psi_t: [B] psi at each row's timestep.
    :param t: [B] integer timesteps.
    :param delta2: [B] mean squared clean-image differences of the pairs, or None.
    :param betas: [T] the noise schedule's betas.
    :return: float32 [B], >= 0.
    """
    weight = psi_t.double() / (1.0 + psi_t.double())
    if delta2 is None:
        return weight.float()
    abar = torch.cumprod(1.0 - betas.double().cpu(), dim=0)[t.long().cpu()]
    return (weight * (abar / (1.0 - abar) * delta2.double().cpu()).sqrt()).float()


def neighbour_pass_rows(psi_t: torch.Tensor, shift: torch.Tensor | None, *, threshold: float,
                        share: float) -> torch.Tensor:
    """Which rows run the neighbour pass: those above the psi threshold (:func:`psi_gate`) and,
    when ``share < 1``, of them at most ``ceil(share * B)``, the ones whose target would move most
    (``shift``, :func:`expected_shift`; ties go to the earlier row).

    :return: bool [B].
    """
    active = psi_gate(psi_t, threshold)
    if share >= 1.0:
        return active
    budget = math.ceil(share * len(psi_t))
    order = torch.argsort(torch.where(active, shift, torch.full_like(shift, -1.0)), descending=True, stable=True)
    keep = torch.zeros_like(active)
    keep[order[:budget]] = True
    return active & keep


def _check_config(cfg: PsiConfig) -> None:
    if cfg.k < 1:
        raise ValueError(f"PsiConfig.k must be >= 1, got {cfg.k}")
    if cfg.psi_max < 0:
        raise ValueError(f"PsiConfig.psi_max must be >= 0, got {cfg.psi_max}")
    if cfg.sampling not in SAMPLING_MODES:
        raise ValueError(f"unknown PsiConfig.sampling {cfg.sampling!r}; choose one of {', '.join(SAMPLING_MODES)}")
    if cfg.pool not in POOLS:
        raise ValueError(f"unknown PsiConfig.pool {cfg.pool!r}; choose one of {', '.join(POOLS)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown PsiConfig.schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def caption_graph(
    pooled: np.ndarray,
    cfg: PsiConfig,
    *,
    classes: Sequence[str] | None = None,
    search: KnnSearch = KnnSearch(),
) -> KnnResult:
    """The caption kNN search the psi table is built on, from the pool ``cfg.pool``: [N, k]
    neighbours (never the row itself), or more columns where one search serves two needs: with
    pool ``"all"``, no classes, the density factor on and more than ``DENSITY_EXACT_MAX``
    captions, its first k columns are the graph and all ``DENSITY_KNN - 1`` the truncated
    kernel density.

    :param search: the approximate index's settings beyond ``cfg.hnsw_above`` (:class:`KnnSearch`).
    :return: a :class:`KnnResult`; ``exact_fallback`` when any of its searches fell back to exact.
    """
    _check_config(cfg)
    pooled = as_normalised("pooled", pooled)
    n = pooled.shape[0]
    labels = None if classes is None else [str(c) for c in classes]
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} classes for {n} caption vectors")
    if cfg.pool == "all" and labels is None and cfg.use_density and n > DENSITY_EXACT_MAX:
        return knn_search(pooled, max(cfg.k, min(DENSITY_KNN, n) - 1), hnsw_above=cfg.hnsw_above, search=search)
    return _search(pooled, cfg, labels, search)


def _search(pooled: np.ndarray, cfg: PsiConfig, classes: list[str] | None, search: KnnSearch) -> KnnResult:
    """Caption kNN: [N, k] sims and ids from the pool ``cfg.pool`` (see :class:`PsiConfig`)."""
    if cfg.pool == "all":
        return knn_search(pooled, cfg.k, hnsw_above=cfg.hnsw_above, search=search)
    if classes is None:
        raise ValueError(f"PsiConfig.pool={cfg.pool!r} needs class labels (classes=...); use pool='all' without them")
    labels = np.asarray(classes, dtype=object)
    if cfg.pool == "other_class":
        return _other_class_search(pooled, cfg, labels, search)
    n = pooled.shape[0]
    sims = np.full((n, cfg.k), -np.inf, np.float32)
    idx = np.full((n, cfg.k), MISSING, np.int64)
    fell_back = False
    for label in dict.fromkeys(classes):
        members = np.flatnonzero(labels == label)
        if members.size < 2:
            continue
        found = knn_search(pooled[members], cfg.k, hnsw_above=cfg.hnsw_above, search=search)
        sims[members] = found.sims
        idx[members] = np.where(found.idx >= 0, members[np.maximum(found.idx, 0)], MISSING)
        fell_back = fell_back or found.exact_fallback
    return KnnResult(sims, idx, exact_fallback=fell_back)


def _other_class_search(pooled: np.ndarray, cfg: PsiConfig, labels: np.ndarray, search: KnnSearch) -> KnnResult:
    """The k nearest captions of *other* classes: one search for k + (largest class, capped)
    candidates, then the query's own class is dropped, order kept."""
    n = pooled.shape[0]
    largest = max(Counter(labels.tolist()).values())
    k_search = min(n - 1, cfg.k + min(largest, OTHER_CLASS_EXTRA))
    found = knn_search(pooled, max(1, k_search), hnsw_above=cfg.hnsw_above, search=search)
    sims, idx = found.sims, found.idx
    valid = idx >= 0
    other = valid & (labels[np.where(valid, idx, 0)] != labels[:, None])
    # Stable sort moves the other-class hits to the front, keeping their similarity order.
    order = np.argsort(~other, axis=1, kind="stable")[:, : cfg.k]
    keep = np.take_along_axis(other, order, axis=1)
    out_sims = np.where(keep, np.take_along_axis(sims, order, axis=1), -np.inf).astype(np.float32)
    out_idx = np.where(keep, np.take_along_axis(idx, order, axis=1), MISSING)
    return KnnResult(*pad_to_k(out_sims, out_idx, cfg.k), exact_fallback=found.exact_fallback)


def _sampling_probs(s_txt: np.ndarray, valid: np.ndarray, sampling: str) -> np.ndarray:
    """[N, k] rows summing to 1: proportional to s_txt over valid slots (uniform if all 0), or top-1."""
    n, k = s_txt.shape
    if sampling == "nearest":
        probs = np.zeros((n, k), np.float64)
        probs[:, 0] = 1.0
        return probs
    weights = np.where(valid, s_txt, 0.0).astype(np.float64)
    total = weights.sum(axis=1, keepdims=True)
    uniform = valid.astype(np.float64)
    weights = np.where(total > 0, weights, uniform)
    weights[~valid.any(axis=1), 0] = 1.0  # no neighbour at all: slot 0 (id -1, psi 0)
    return weights / weights.sum(axis=1, keepdims=True)


def build_neighbour_table(
    pooled: np.ndarray,
    image_feats: np.ndarray | None,
    cfg: PsiConfig,
    *,
    classes: Sequence[str] | None = None,
    clean: np.ndarray | torch.Tensor | None = None,
    graph: KnnResult | None = None,
) -> NeighbourTable:
    """Build the psi table: one FAISS search over the captions, from the pool ``cfg.pool``.

    :param pooled: [N x D] L2-normalised caption vectors (``TextEmbeddings.pooled``).
    :param image_feats: [N x F] image features (:func:`image_features`); may be None when
        ``cfg.use_image_sim`` is off.
    :param cfg: the PsiConfig.
    :param classes: optional N class labels: class-count density weights, the class pools,
        and psi 0 for samples whose class has a single sample (nothing to borrow from).
    :param clean: [N x ...] clean images in diffusion space (pixels in [-1, 1] or latents); gives
        ``delta2``, the pair's mean squared difference, needed by ``cfg.schedule == "gaussian"``.
    :param graph: the caption search, :func:`caption_graph` of the same inputs (made here when
        None); passing it lets a caller choose the index settings and read ``exact_fallback``.
    :return: the :class:`NeighbourTable`.
    """
    _check_config(cfg)
    pooled = as_normalised("pooled", pooled)
    n = pooled.shape[0]
    labels = None if classes is None else [str(c) for c in classes]
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} classes for {n} caption vectors")

    if graph is None:
        graph = caption_graph(pooled, cfg, classes=labels)
    if graph.idx.shape[0] != n or graph.idx.shape[1] < cfg.k:
        raise ValueError(f"the caption graph has shape {graph.idx.shape} but the table needs [{n}, >= {cfg.k}]: "
                         "pass neighbours.caption_graph of the same captions and PsiConfig")
    # A wider graph (caption_graph's shared search) also serves the truncated kernel density.
    sims, idx = graph.sims[:, : cfg.k], graph.idx[:, : cfg.k]
    valid = idx >= 0
    safe_idx = np.where(valid, idx, 0)
    s_txt = np.where(valid, np.maximum(sims, 0.0), 0.0).astype(np.float32)
    s_img = _image_similarity(image_feats, safe_idx, valid, n, required=cfg.use_image_sim)
    if cfg.use_density:
        w = density_weights(classes=labels, pooled=pooled, gamma=cfg.density_gamma, bandwidth=cfg.kde_bandwidth,
                            neighbours=(graph.sims, graph.idx))
    else:
        w = np.ones(n, np.float32)

    psi = cfg.psi_max * w[:, None].astype(np.float64) * np.ones((n, cfg.k))
    if cfg.use_image_sim:
        psi = psi * s_img
    if cfg.use_text_sim:
        psi = psi * s_txt
    psi = np.where(valid, psi, 0.0)
    if labels is not None:
        counts = Counter(labels)
        psi[np.array([counts[c] == 1 for c in labels])] = 0.0
        if cfg.rare_only:  # rarity psi: only classes below the median class size borrow
            median = float(np.median(list(counts.values())))
            psi[np.array([counts[c] >= median for c in labels])] = 0.0
    probs = _sampling_probs(s_txt, valid, cfg.sampling)
    delta2 = pair_delta2(clean, idx) if clean is not None else None
    table = NeighbourTable(
        indices=idx, s_txt=s_txt, s_img=s_img, w_density=w.astype(np.float32),
        psi=psi.astype(np.float32), probs=probs.astype(np.float32), config=cfg, delta2=delta2,
    )
    logger.info(
        "neighbour table: %d samples, k=%d, mean psi %.4f, %.1f%% of rows above threshold %.3g",
        n, cfg.k, float(table.psi.mean()), 100.0 * float(psi_gate(table.psi.max(axis=1), cfg.psi_threshold).mean()),
        cfg.psi_threshold,
    )
    return table


def pair_delta2(clean: np.ndarray | torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """Mean squared difference per dimension between each row's clean image and its neighbours'.

    :param clean: [N x ...] clean images in diffusion space.
    :param idx: [N x k] neighbour ids (-1 = empty slot, which gets 0).
    :return: float32 [N x k].
    """
    x = torch.as_tensor(clean).float().reshape(len(clean), -1)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"clean has {x.shape[0]} rows but the neighbour ids have {idx.shape[0]}")
    ids = torch.from_numpy(np.where(idx >= 0, idx, 0))
    out = torch.empty(ids.shape, dtype=torch.float32)
    for start in range(0, len(x), IMAGE_FEATURE_CHUNK):
        rows = slice(start, start + IMAGE_FEATURE_CHUNK)
        diff = x[rows, None, :] - x[ids[rows]]  # [B, k, D]
        out[rows] = diff.pow(2).mean(dim=2)
    return np.where(idx >= 0, out.numpy(), 0.0).astype(np.float32)


def gaussian_psi_factor(t: torch.Tensor, delta2: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``beta_tilde_t / (beta_tilde_t + coef1_t^2 * delta2)`` (README "The method").

    A neighbour whose clean image differs from x0 by ``delta2`` (mean squared, per dimension)
    has a posterior mean off by ``coef1_t * delta``, ``coef1_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)``;
    as an estimate of x_{t-1} its variance is ``sigma'^2 = beta_tilde_t + coef1_t^2 delta2`` and
    its precision relative to the ground truth is this factor: near 1 at high noise, near 0 at
    low noise (where ``beta_tilde_t -> 0``). Computed in float64.

    :param t: [B] integer timesteps (0-based, as the schedulers index them).
    :param delta2: [B] mean squared differences, >= 0.
    :param betas: [T] the noise schedule's betas (``scheduler.betas``); abar is their float64
        cumulative product.
    :return: float32 [B] in [0, 1].
    """
    beta = betas.double().cpu()
    abar = torch.cumprod(1.0 - beta, dim=0)
    t = t.long().cpu()
    abar_t = abar[t]
    abar_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar_t))
    beta_t = beta[t]
    beta_tilde = beta_t * (1.0 - abar_prev) / (1.0 - abar_t)
    coef1 = abar_prev.sqrt() * beta_t / (1.0 - abar_t)
    denom = beta_tilde + coef1**2 * delta2.double().cpu()
    factor = torch.where(denom > 0, beta_tilde / denom.clamp(min=1e-300), torch.ones_like(denom))
    return factor.float()


def _image_similarity(
    feats: np.ndarray | None, idx: np.ndarray, valid: np.ndarray, n: int, *, required: bool
) -> np.ndarray:
    """max(0, cosine) between each row's features and its neighbours': [N, k] float32."""
    if feats is None:
        if required:
            raise ValueError("image_feats is None but PsiConfig.use_image_sim is on")
        return np.ones(idx.shape, np.float32)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != n:
        raise ValueError(f"image_feats must be [{n}, F], got shape {feats.shape}")
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
    cos = np.einsum("nf,nkf->nk", unit, unit[idx])
    return np.where(valid, np.clip(cos, 0.0, 1.0), 0.0).astype(np.float32)
