"""k-nearest-neighbour search over L2-normalised vectors (BENCHMARKS.md "Caption kNN graph + psi table").

Exact (FAISS inner product) up to a size threshold, approximate beyond it: an IVF self-join
batched by list for the caption graph, with a recall guard that falls back to exact search, or
an HNSW / IVF index for queries. :mod:`pogdiff.method.neighbours` builds the psi table on top.

:func:`knn` returns the arrays; :func:`knn_search` takes the approximate index's settings as one
:class:`KnnSearch` and returns a :class:`KnnResult`, which also says whether the recall guard fell
back to exact search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)

MISSING = -1  # neighbour id of an empty slot
HNSW_M = 32  # graph degree of the HNSW index
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH_MIN = 64
NORM_TOLERANCE = 1e-3  # allowed deviation of ||v|| from 1 for "L2-normalised" inputs
KNN_APPROX_ABOVE = 50_000  # knn's default size threshold for the approximate index
# IVF self-join (the caption graph, every row querying the set): lists probed per list, rows whose
# exact neighbours are checked, and the recall below which the join falls back to exact search.
JOIN_NPROBE = 8
JOIN_CHECK_ROWS = 256
JOIN_MIN_RECALL = 0.95
JOIN_RECALL_K = 10  # the guard checks the nearest this many (the graph uses k <= 10; the density's
# longer tail only enters a kernel sum, where a missed far neighbour changes little)
JOIN_KMEANS_ITERS = 10


# --------------------------------------------------------------------------------------------
# kNN search


@dataclass(frozen=True)
class KnnSearch:
    """How :func:`knn_search` searches beyond its size threshold (the defaults are :func:`knn`'s).

    ``approx``: ``"ivf"`` (the list-batched self-join with its recall guard for the caption graph,
    IVF-Flat for other queries) or ``"hnsw"``; ``nprobe``: IVF lists visited per query (an explicit
    value turns the self-join's recall guard off); ``ef_search``: HNSW search breadth; ``nlist``:
    IVF lists.
    """

    approx: str = "ivf"
    nprobe: int | None = None
    ef_search: int | None = None
    nlist: int | None = None


@dataclass(frozen=True)
class KnnResult:
    """Neighbours found and how: ``sims`` float32 [Q, k] descending, ``idx`` int64 [Q, k] (``-1``
    padding); ``exact_fallback`` is True when the IVF self-join's recall guard found the
    approximate graph too poor and recomputed it exactly (BENCHMARKS.md "Caption kNN graph + psi table")."""

    sims: np.ndarray
    idx: np.ndarray
    exact_fallback: bool = False


def as_normalised(name: str, vectors: np.ndarray) -> np.ndarray:
    """`vectors` as a C-contiguous float32 [N, D] array, checked to be L2-normalised rows (ValueError naming `name` otherwise)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"{name} must be L2-normalised; row {bad[0]} has norm {norms[bad[0]]:.4g} "
            f"({bad.size} such rows)"
        )
    return v


APPROX_INDEXES = ("hnsw", "ivf")  # approximate index kinds used beyond the size threshold
IVF_POINTS_PER_LIST = 39  # k-means needs about this many training points per list
IVF_TRAIN_MAX = 65_536  # k-means trains on at most this many (random) rows
IVF_NPROBE_FRACTION = 0.125  # default share of the lists visited per query


def choose_index(n: int, approx_above: int, approx: str = "ivf") -> str:
    """Which index :func:`knn` builds for ``n`` database rows: ``"flat"`` (exact) up to
    ``approx_above`` rows, the approximate ``approx`` (``"hnsw"`` or ``"ivf"``) beyond."""
    if approx not in APPROX_INDEXES:
        raise ValueError(f"unknown approximate index {approx!r}; choose one of {', '.join(APPROX_INDEXES)}")
    if n < 1:
        raise ValueError(f"need at least one database row, got n={n}")
    return "flat" if n <= approx_above else approx


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` rows: about ``4 sqrt(n)``, at most ``n / IVF_POINTS_PER_LIST``."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // IVF_POINTS_PER_LIST)))


def join_nlist(n: int) -> int:
    """Inverted lists of the IVF self-join for ``n`` rows: about ``2 sqrt(n)`` (lists of about
    ``sqrt(n) / 2`` rows, so each list's query block times its candidates is one mid-sized matrix
    product), at most ``n / IVF_POINTS_PER_LIST``."""
    return int(max(1, min(round(2 * np.sqrt(n)), n // IVF_POINTS_PER_LIST)))


def ivf_self_join(
    vectors: np.ndarray,
    k: int,
    *,
    exclude_self: bool = True,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    min_recall: float = JOIN_MIN_RECALL,
    check_rows: int = JOIN_CHECK_ROWS,
) -> KnnResult:
    """Top-k neighbours of every row among all rows, IVF-style but batched by list.

    k-means (FAISS, spherical) splits the rows into ``nlist`` lists. The rows of one list are
    queried together against the rows of the ``nprobe`` lists whose centroids are nearest to
    that list's centroid (its own first): one float32 matrix product per list instead of one
    scan per query, which is what makes the approximate graph cheap on a CPU (BENCHMARKS.md
    "Scale"). Probing by the list's centroid rather than by each query is the approximation.

    Recall guard: with ``nprobe=None`` (automatic), the exact nearest ``min(k, JOIN_RECALL_K)``
    neighbours of ``check_rows`` random rows are computed by brute force; when the join's recall
    of them is below ``min_recall``
    (data without cluster structure, such as isotropic random vectors, where no index can prune),
    the whole graph is recomputed exactly, a warning says so and the result's ``exact_fallback``
    is True. With an explicit ``nprobe`` the caller gets exactly what they asked for.

    :return: a :class:`KnnResult`, arrays as :func:`knn`'s: float32 / int64 [N x k], descending,
        ``-1`` padding.
    """
    v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n, d = v.shape
    lists = join_nlist(n) if nlist is None else int(nlist)
    if not 1 <= lists <= n:
        raise ValueError(f"IVF nlist must be in [1, {n}], got {lists}")
    probes_per_list = min(lists, JOIN_NPROBE if nprobe is None else max(1, int(nprobe)))
    train_rows = np.random.default_rng(seed).choice(n, size=min(n, IVF_POINTS_PER_LIST * lists), replace=False)
    kmeans = faiss.Kmeans(d, lists, niter=JOIN_KMEANS_ITERS, seed=seed, spherical=True,
                          max_points_per_centroid=IVF_POINTS_PER_LIST, verbose=False)
    kmeans.train(np.ascontiguousarray(vectors[np.sort(train_rows)], dtype=np.float32))
    centroids = torch.from_numpy(kmeans.centroids)
    assign = (v @ centroids.T).argmax(dim=1)
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=lists)
    starts = torch.cumsum(counts, 0) - counts
    closeness = centroids @ centroids.T
    closeness.fill_diagonal_(float("inf"))  # a list always probes itself first
    probes = torch.topk(closeness, probes_per_list, dim=1).indices
    members = [order[starts[c]:starts[c] + counts[c]] for c in range(lists)]

    sims = torch.full((n, k), -float("inf"))
    idx = torch.full((n, k), MISSING, dtype=torch.long)
    for c in range(lists):
        rows = members[c]
        if rows.numel() == 0:
            continue
        cand = torch.cat([members[p] for p in probes[c].tolist()])
        scores = v[rows] @ v[cand].T
        if exclude_self:
            scores.masked_fill_(rows[:, None] == cand[None, :], -float("inf"))
        top = min(k, cand.numel() - int(exclude_self))
        if top < 1:
            continue
        s, i = torch.topk(scores, top, dim=1)
        sims[rows, :top] = s
        idx[rows, :top] = torch.where(torch.isfinite(s), cand[i], MISSING)
    sims_np, idx_np = sims.numpy(), idx.numpy()
    if nprobe is None and probes_per_list < lists:
        k_check = min(k, JOIN_RECALL_K, n - int(exclude_self))
        check = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n, check_rows), replace=False))
        exact = exact_knn_rows(vectors, check, k_check, exclude_self=exclude_self)
        recall = recall_at_k(idx_np[check], exact, k_check)
        logger.info("kNN: IVF self-join over %d vectors (%d lists, %d probed), recall@%d %.3f on %d rows",
                    n, lists, probes_per_list, k_check, recall, check.size)
        if recall < min_recall:
            logger.warning(
                "kNN: the approximate caption graph found only %.0f%% of the exact neighbours of %d sampled "
                "captions (target %.0f%%): these embeddings have little cluster structure, so the graph is "
                "computed exactly instead (slower).", 100 * recall, check.size, 100 * min_recall)
            index = build_index(np.ascontiguousarray(vectors, dtype=np.float32), n)
            k_search = min(k + int(exclude_self), n)
            s, i = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k_search)
            s, i = s.astype(np.float32), i.astype(np.int64)
            if exclude_self:
                s, i = _drop_self(s, i)
            s[i < 0] = -np.inf
            return KnnResult(*pad_to_k(s, i, k), exact_fallback=True)
    return KnnResult(sims_np.astype(np.float32), idx_np.astype(np.int64))


def build_index(
    vectors: np.ndarray,
    hnsw_above: int,
    *,
    approx: str = "hnsw",
    nlist: int | None = None,
    seed: int = 0,
) -> faiss.Index:
    """Flat inner-product index (on GPU when faiss has one) up to ``hnsw_above`` rows; beyond it
    the approximate ``approx`` index: HNSW, or IVF-Flat with ``nlist`` lists (:func:`ivf_nlist`)
    trained by k-means on at most ``IVF_TRAIN_MAX`` rows drawn with ``seed``."""
    n, d = vectors.shape
    kind = choose_index(n, hnsw_above, approx)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        logger.info("kNN: HNSW index over %d vectors (dim %d)", n, d)
    elif kind == "ivf":
        lists = ivf_nlist(n) if nlist is None else int(nlist)
        if not 1 <= lists <= n:
            raise ValueError(f"IVF nlist must be in [1, {n}], got {lists}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        train_rows = np.random.default_rng(seed).choice(n, size=min(n, IVF_TRAIN_MAX), replace=False)
        index.train(vectors[np.sort(train_rows)])
        logger.info("kNN: IVF-Flat index over %d vectors (dim %d, %d lists)", n, d, lists)
    else:
        index = faiss.IndexFlatIP(d)
        if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            logger.info("kNN: flat GPU index over %d vectors (dim %d)", n, d)
    index.add(vectors)
    return index


def knn(
    vectors: np.ndarray,
    k: int,
    *,
    exclude_self: bool = True,
    hnsw_above: int = KNN_APPROX_ABOVE,
    queries: np.ndarray | None = None,
    approx: str = "ivf",
    nprobe: int | None = None,
    ef_search: int | None = None,
    nlist: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product (cosine) neighbours with FAISS.

    :param vectors: [N x D] L2-normalised database vectors.
    :param k: neighbours per query, ``k >= 1``.
    :param exclude_self: when ``queries`` is None (each row queries itself), drop the query's
        own row from its result (k + 1 are searched). Ignored when ``queries`` is given.
    :param hnsw_above: use the approximate ``approx`` index when N exceeds this, else an exact
        flat one (see :func:`choose_index`).
    :param queries: optional [Q x D] L2-normalised query vectors; defaults to ``vectors``.
    :param approx: ``"ivf"`` (default) or ``"hnsw"``. With ``"ivf"`` and ``queries=None`` (the
        caption graph) the search is :func:`ivf_self_join`, with its recall guard.
    :param nprobe: IVF lists visited per query (default ``IVF_NPROBE_FRACTION`` of the lists;
        for the self-join ``JOIN_NPROBE`` and the recall guard).
    :param ef_search: HNSW search breadth (default ``max(HNSW_EF_SEARCH_MIN, 2 k)``).
    :param nlist: IVF lists (default :func:`ivf_nlist`).
    :return: ``(sims, idx)``: float32 [Q x k] similarities in descending order and int64
        [Q x k] row ids. When fewer than k candidates exist (k >= N), the missing slots are
        padded with id ``-1`` and similarity ``-inf``. :func:`knn_search` also says whether the
        recall guard fell back to exact search.
    """
    found = knn_search(vectors, k, exclude_self=exclude_self, hnsw_above=hnsw_above, queries=queries,
                       search=KnnSearch(approx=approx, nprobe=nprobe, ef_search=ef_search, nlist=nlist))
    return found.sims, found.idx


def knn_search(
    vectors: np.ndarray,
    k: int,
    *,
    exclude_self: bool = True,
    hnsw_above: int = KNN_APPROX_ABOVE,
    queries: np.ndarray | None = None,
    search: KnnSearch = KnnSearch(),
) -> KnnResult:
    """:func:`knn` with the approximate index's settings in ``search``, returning a
    :class:`KnnResult` (the arrays and whether the self-join's recall guard fell back to exact)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    base = as_normalised("vectors", vectors)
    self_query = queries is None
    q = base if self_query else as_normalised("queries", queries)
    if q.shape[1] != base.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but vectors have dim {base.shape[1]}")
    drop_self = exclude_self and self_query
    n = base.shape[0]
    if self_query and choose_index(n, hnsw_above, search.approx) == "ivf":
        return ivf_self_join(base, k, exclude_self=drop_self, nlist=search.nlist, nprobe=search.nprobe)
    k_search = min(k + int(drop_self), n)
    index = build_index(base, hnsw_above, approx=search.approx, nlist=search.nlist)
    if isinstance(index, faiss.IndexHNSWFlat):
        index.hnsw.efSearch = (max(HNSW_EF_SEARCH_MIN, 2 * k_search) if search.ef_search is None
                               else int(search.ef_search))
    if isinstance(index, faiss.IndexIVFFlat):
        probes = max(1, round(IVF_NPROBE_FRACTION * index.nlist)) if search.nprobe is None else int(search.nprobe)
        index.nprobe = min(max(1, probes), index.nlist)
    sims, idx = index.search(q, k_search)
    sims, idx = sims.astype(np.float32), idx.astype(np.int64)
    if drop_self:
        sims, idx = _drop_self(sims, idx)
    sims[idx < 0] = -np.inf
    return KnnResult(*pad_to_k(sims, idx, k))


def exact_knn_rows(
    vectors: np.ndarray, rows: np.ndarray, k: int, *, exclude_self: bool = True, block: int = 1024
) -> np.ndarray:
    """Brute-force numpy top-k neighbour ids of the database rows ``rows``: int64 [len(rows), k].

    The reference for :func:`recall_at_k`; ties are broken by the lower row id.
    """
    v = np.asarray(vectors, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if k < 1 or k + int(exclude_self) > v.shape[0]:
        raise ValueError(f"k must be in [1, {v.shape[0] - int(exclude_self)}], got {k}")
    out = np.empty((rows.size, k), np.int64)
    for start in range(0, rows.size, block):
        r = rows[start : start + block]
        sims = v[r] @ v.T  # [b, N]
        if exclude_self:
            sims[np.arange(r.size), r] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(sims, part, axis=1)), axis=1)
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each row's exact top-k ids that ``found``'s first k columns contain.

    :param found: int [Q x >=k] ids from an (approximate) search; ``-1`` never matches.
    :param exact: int [Q x >=k] exact ids (e.g. :func:`exact_knn_rows`).
    """
    found, exact = np.asarray(found), np.asarray(exact)
    if found.shape[0] != exact.shape[0] or min(found.shape[1], exact.shape[1]) < k or k < 1:
        raise ValueError(f"need two [Q, >={k}] id arrays with the same Q, got {found.shape} and {exact.shape}")
    f, e = found[:, :k], exact[:, :k]
    hits = ((f[:, :, None] == e[:, None, :]) & (f[:, :, None] >= 0)).any(axis=1)  # [Q, k]
    return float(hits.mean())


def _drop_self(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (or, if a tie pushed it out, the last column): [Q, m] -> [Q, m-1]."""
    q, m = idx.shape
    is_self = idx == np.arange(q)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), m - 1)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(q), drop] = False
    return sims[keep].reshape(q, m - 1), idx[keep].reshape(q, m - 1)


def pad_to_k(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sims, idx)`` widened to ``k`` columns: missing neighbours are ``-inf`` with index ``MISSING``."""
    missing = k - idx.shape[1]
    if missing <= 0:
        return sims, idx
    q = idx.shape[0]
    sims = np.concatenate([sims, np.full((q, missing), -np.inf, np.float32)], axis=1)
    idx = np.concatenate([idx, np.full((q, missing), MISSING, np.int64)], axis=1)
    return sims, idx
