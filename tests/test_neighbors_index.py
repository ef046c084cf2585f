"""Index choice (flat below the threshold, IVF / HNSW above) and recall against brute force."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pogdiff.neighbors import (
    _build_index,
    choose_index,
    exact_knn_rows,
    ivf_nlist,
    knn,
    recall_at_k,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_choose_index_by_threshold():
    assert choose_index(100, 100) == "flat"
    assert choose_index(101, 100) == "hnsw"
    assert choose_index(101, 100, "ivf") == "ivf"
    with pytest.raises(ValueError, match="unknown approximate index 'lsh'"):
        choose_index(10, 5, "lsh")


@pytest.mark.parametrize("approx, cls", [("ivf", faiss.IndexIVFFlat), ("hnsw", faiss.IndexHNSWFlat)])
def test_build_index_flat_below_and_approximate_above_a_tiny_threshold(approx, cls):
    v = _unit(200, 8)
    assert isinstance(_build_index(v, 200, approx=approx), faiss.IndexFlatIP)
    index = _build_index(v, 199, approx=approx)
    assert isinstance(index, cls) and index.ntotal == 200


def test_ivf_nlist_and_bad_nlist():
    assert ivf_nlist(100_000) == round(4 * np.sqrt(100_000))
    assert ivf_nlist(390) == 10  # capped by 39 training points per list
    assert ivf_nlist(5) == 1
    with pytest.raises(ValueError, match="IVF nlist must be in"):
        _build_index(_unit(50, 4), 10, approx="ivf", nlist=51)


def test_ivf_visiting_every_list_is_exact_and_one_list_is_not():
    v = _unit(800, 16, seed=2)
    rows = np.arange(0, 800, 7)
    exact = exact_knn_rows(v, rows, 5)
    _, idx_all = knn(v, 5, hnsw_above=100, approx="ivf", nlist=16, nprobe=16)
    assert recall_at_k(idx_all[rows], exact, 5) == pytest.approx(1.0)
    _, idx_one = knn(v, 5, hnsw_above=100, approx="ivf", nlist=16, nprobe=1)
    assert recall_at_k(idx_one[rows], exact, 5) < 0.9  # random data: one list of 16 misses neighbours


def test_exact_knn_rows_matches_full_sort():
    v = _unit(120, 6, seed=4)
    rows = np.array([0, 5, 119])
    sims = v[rows] @ v.T
    sims[np.arange(3), rows] = -np.inf
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(exact_knn_rows(v, rows, 4, block=2), expected)
    kept = exact_knn_rows(v, rows, 1, exclude_self=False)
    np.testing.assert_array_equal(kept[:, 0], rows)
    with pytest.raises(ValueError, match="k must be in"):
        exact_knn_rows(v, rows, 120)


def test_recall_at_k_counts_overlap_in_any_order_and_ignores_missing():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [-1, -1, 4]])
    assert recall_at_k(found, exact, 3) == pytest.approx((2 + 1) / 6)
    assert recall_at_k(exact, exact, 2) == 1.0
    assert recall_at_k(np.array([[-1, -1]]), np.array([[-1, 0]]), 2) == 0.0
    with pytest.raises(ValueError, match="same Q"):
        recall_at_k(found[:1], exact, 3)


def test_truncated_kernel_density_in_query_blocks_equals_one_knn_search(monkeypatch):
    from pogdiff import neighbors

    v = _unit(300, 8, seed=5)
    monkeypatch.setattr(neighbors, "DENSITY_EXACT_MAX", 100)
    monkeypatch.setattr(neighbors, "DENSITY_KNN", 20)
    monkeypatch.setattr(neighbors, "DENSITY_QUERY_BLOCK", 64)
    rho = neighbors._kernel_density(v, 0.3)
    sims, idx = knn(v, 20, exclude_self=False)
    expected = np.exp(-((1.0 - sims.astype(np.float64)) ** 2) / (2 * 0.3**2)).sum(axis=1)
    np.testing.assert_allclose(rho, expected, rtol=1e-6)
    # the truncated sum is a lower bound of the exact all-pairs sum
    exact = np.exp(-((1.0 - v.astype(np.float64) @ v.T.astype(np.float64)) ** 2) / (2 * 0.3**2)).sum(axis=1)
    assert np.all(rho <= exact + 1e-9) and np.all(rho >= 1.0 - 1e-6)
