"""Index choice (flat below the threshold, IVF / HNSW above) and recall against brute force."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pogdiff.method.neighbours import (
    knn,
)
from pogdiff.method.knn import (
    build_index,
    choose_index,
    exact_knn_rows,
    ivf_nlist,
    ivf_self_join,
    recall_at_k,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_choose_index_by_threshold():
    assert choose_index(100, 100) == "flat"
    assert choose_index(101, 100) == "ivf"
    assert choose_index(101, 100, "hnsw") == "hnsw"
    with pytest.raises(ValueError, match="unknown approximate index 'lsh'"):
        choose_index(10, 5, "lsh")


@pytest.mark.parametrize("approx, cls", [("ivf", faiss.IndexIVFFlat), ("hnsw", faiss.IndexHNSWFlat)])
def test_build_index_flat_below_and_approximate_above_a_tiny_threshold(approx, cls):
    v = _unit(200, 8)
    assert isinstance(build_index(v, 200, approx=approx), faiss.IndexFlatIP)
    index = build_index(v, 199, approx=approx)
    assert isinstance(index, cls) and index.ntotal == 200


def test_ivf_nlist_and_bad_nlist():
    assert ivf_nlist(100_000) == round(4 * np.sqrt(100_000))
    assert ivf_nlist(390) == 10  # capped by 39 training points per list
    assert ivf_nlist(5) == 1
    with pytest.raises(ValueError, match="IVF nlist must be in"):
        build_index(_unit(50, 4), 10, approx="ivf", nlist=51)


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


def test_truncated_kernel_density_equals_the_top_k_sum(monkeypatch):
    from pogdiff.method import neighbours

    v = _unit(300, 8, seed=5)
    monkeypatch.setattr(neighbours, "DENSITY_EXACT_MAX", 100)
    monkeypatch.setattr(neighbours, "DENSITY_KNN", 20)
    rho = neighbours._kernel_density(v, 0.3)
    sims, idx = knn(v, 20, exclude_self=False)  # the row itself (kernel 1) and its 19 nearest
    expected = np.exp(-((1.0 - sims.astype(np.float64)) ** 2) / (2 * 0.3**2)).sum(axis=1)
    np.testing.assert_allclose(rho, expected, rtol=1e-5)
    # the truncated sum is a lower bound of the exact all-pairs sum
    exact = np.exp(-((1.0 - v.astype(np.float64) @ v.T.astype(np.float64)) ** 2) / (2 * 0.3**2)).sum(axis=1)
    assert np.all(rho <= exact + 1e-9) and np.all(rho >= 1.0 - 1e-6)
    # a search passed in is reused, not repeated
    shared = knn(v, 25)
    np.testing.assert_allclose(neighbours._kernel_density(v, 0.3, shared), expected, rtol=1e-5)


def _clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_self_join_probing_every_list_is_exact():
    v = _unit(900, 12, seed=7)
    found = ivf_self_join(v, 4, nlist=9, nprobe=9)
    sims, idx = found.sims, found.idx
    exact = exact_knn_rows(v, np.arange(900), 4)
    np.testing.assert_array_equal(idx, exact)
    np.testing.assert_allclose(sims, np.take_along_axis(v @ v.T, exact, axis=1), atol=1e-5)
    assert not np.any(idx == np.arange(900)[:, None])  # never the row itself


def test_ivf_self_join_recall_guard_falls_back_to_exact_on_unstructured_data(caplog):
    v = _unit(2000, 32, seed=8)  # isotropic: a few probed lists miss most neighbours
    exact = exact_knn_rows(v, np.arange(2000), 5)
    fixed = ivf_self_join(v, 5, nlist=40, nprobe=2)  # explicit nprobe: no guard
    assert recall_at_k(fixed.idx, exact, 5) < 0.5 and not fixed.exact_fallback
    with caplog.at_level("WARNING", logger="pogdiff.method.knn"):
        guarded = ivf_self_join(v, 5, nlist=40)  # automatic nprobe: guard on
    assert recall_at_k(guarded.idx, exact, 5) == 1.0
    assert guarded.exact_fallback  # the result says so, and so does the log
    assert "computed exactly instead" in caplog.text


def test_ivf_self_join_keeps_the_fast_graph_on_clustered_data(caplog):
    v = _clustered(3000, 32, clusters=30, seed=9)
    with caplog.at_level("WARNING", logger="pogdiff.method.knn"):
        found = ivf_self_join(v, 5, nlist=60)
    assert not found.exact_fallback and "computed exactly" not in caplog.text
    idx = found.idx
    rows = np.arange(0, 3000, 5)
    assert recall_at_k(idx[rows], exact_knn_rows(v, rows, 5), 5) >= 0.95


def test_knn_self_query_above_the_threshold_is_the_self_join():
    v = _clustered(1500, 16, clusters=12, seed=10)
    np.testing.assert_array_equal(knn(v, 3, hnsw_above=100, nlist=20, nprobe=3)[1],
                                  ivf_self_join(v, 3, nlist=20, nprobe=3).idx)


def test_psi_table_shares_one_search_between_graph_and_density(monkeypatch):
    from pogdiff.method import neighbours
    from pogdiff.config import PsiConfig

    v = _clustered(400, 16, clusters=8, seed=11)
    monkeypatch.setattr(neighbours, "DENSITY_EXACT_MAX", 100)
    monkeypatch.setattr(neighbours, "DENSITY_KNN", 30)
    calls = []
    real, real_search = neighbours.knn, neighbours.knn_search
    monkeypatch.setattr(neighbours, "knn", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    monkeypatch.setattr(neighbours, "knn_search", lambda *a, **kw: calls.append(a[1]) or real_search(*a, **kw))
    cfg = PsiConfig(k=4, pool="all", use_image_sim=False)
    table = neighbours.build_neighbour_table(v, None, cfg)
    assert calls == [29]  # one search: 29 others + the row itself make the density's 30
    np.testing.assert_array_equal(table.indices, real(v, 4)[1])
    expected_w = neighbours.density_weights(classes=None, pooled=v, gamma=cfg.density_gamma,
                                           bandwidth=cfg.kde_bandwidth, neighbours=real(v, 29))
    np.testing.assert_allclose(table.w_density, expected_w, rtol=1e-6)


def test_caption_graph_takes_the_index_settings_and_reports_the_fallback():
    from pogdiff.method import neighbours
    from pogdiff.config import PsiConfig
    from pogdiff.method.knn import KnnSearch

    v = _unit(2000, 32, seed=8)  # isotropic: the self-join's recall guard falls back to exact
    cfg = PsiConfig(k=5, pool="all", hnsw_above=100, use_density=False, use_image_sim=False)
    guarded = neighbours.caption_graph(v, cfg)
    assert guarded.exact_fallback
    fixed = neighbours.caption_graph(v, cfg, search=KnnSearch(nlist=40, nprobe=2))  # explicit nprobe: as asked
    assert not fixed.exact_fallback
    exact = exact_knn_rows(v, np.arange(2000), 5)
    assert recall_at_k(guarded.idx, exact, 5) == 1.0 and recall_at_k(fixed.idx, exact, 5) < 0.5
    table = neighbours.build_neighbour_table(v, None, cfg, graph=fixed)
    np.testing.assert_array_equal(table.indices, fixed.idx)  # the table is built on the graph it was given
    with pytest.raises(ValueError, match="caption graph has shape"):
        neighbours.build_neighbour_table(v[:100], None, cfg, graph=fixed)
