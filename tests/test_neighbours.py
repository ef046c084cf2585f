"""FAISS against brute force, psi monotonicity, density weights, draws, round trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pogdiff.config import PsiConfig
from pogdiff.method.neighbours import (
    gaussian_psi_factor,
    pair_delta2,
    build_neighbour_table,
    density_weights,
    image_features,
    knn,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute_topk(vectors, k, queries=None, exclude_self=True):
    q = vectors if queries is None else queries
    sims = q.astype(np.float64) @ vectors.T.astype(np.float64)
    if exclude_self and queries is None:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("exclude_self", [True, False])
def test_knn_equals_brute_force(exclude_self):
    v = _unit(300, 16, seed=1)
    sims, idx = knn(v, 7, exclude_self=exclude_self)
    b_sims, b_idx = _brute_topk(v, 7, exclude_self=exclude_self)
    assert sims.shape == idx.shape == (300, 7)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_allclose(sims, b_sims, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)
    # continuous random vectors: ties only where sims agree to float precision
    tie = np.abs(sims[:, :, None] - b_sims[:, None, :]) < 1e-6
    assert np.all((idx == b_idx) | tie.any(axis=2))
    assert (idx == b_idx).mean() > 0.99
    if exclude_self:
        assert not np.any(idx == np.arange(300)[:, None])
    else:
        np.testing.assert_array_equal(idx[:, 0], np.arange(300))


def test_knn_with_duplicates_never_returns_self_and_keeps_tied_sims():
    base = _unit(20, 8, seed=2)
    v = np.concatenate([base, base])  # every vector has an exact twin
    sims, idx = knn(v, 3)
    assert not np.any(idx == np.arange(40)[:, None])
    twin = (np.arange(40) + 20) % 40
    assert np.all(idx[:, 0] == twin)  # the twin (cosine 1) is the nearest non-self row
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    b_sims, _ = _brute_topk(v, 3)
    np.testing.assert_allclose(sims, b_sims, atol=1e-5)


def test_knn_explicit_queries_and_padding():
    v = _unit(5, 4, seed=3)
    q = _unit(3, 4, seed=4)
    sims, idx = knn(v, 2, queries=q)
    b_sims, b_idx = _brute_topk(v, 2, queries=q)
    np.testing.assert_array_equal(idx, b_idx)
    np.testing.assert_allclose(sims, b_sims, atol=1e-6)
    # k >= N: 4 real neighbours (self excluded), the rest padded with -1 / -inf
    sims, idx = knn(v, 6)
    assert idx.shape == (5, 6)
    assert np.all(idx[:, 4:] == -1) and np.all(np.isneginf(sims[:, 4:]))
    assert np.all(idx[:, :4] >= 0)
    assert all(set(idx[i, :4]) == set(range(5)) - {i} for i in range(5))


def test_knn_bad_inputs():
    v = _unit(5, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn(v, 0)
    with pytest.raises(ValueError, match="vectors must be L2-normalised; row 0"):
        knn(v * 2, 2)
    with pytest.raises(ValueError, match="queries have dim 3"):
        knn(v, 2, queries=_unit(2, 3))


def test_hnsw_path_has_high_recall():
    v = _unit(2000, 16, seed=5)
    sims, idx = knn(v, 10, hnsw_above=500)
    _, b_idx = _brute_topk(v, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, b_idx)])
    assert recall > 0.95
    assert not np.any(idx == np.arange(2000)[:, None])
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_density_weights_from_classes():
    classes = ["a"] * 8 + ["b"] * 4 + ["c"] * 2 + ["d"]
    w = density_weights(classes=classes, pooled=None, gamma=1.0, bandwidth=0.2)
    expected = {"a": 1 / 8, "b": 1 / 4, "c": 1 / 2, "d": 1.0}
    np.testing.assert_allclose(w, [expected[c] for c in classes], rtol=1e-6)
    w2 = density_weights(classes=classes, pooled=None, gamma=0.5, bandwidth=0.2)
    np.testing.assert_allclose(w2, np.sqrt(w), rtol=1e-6)
    assert np.all(density_weights(classes=classes, pooled=None, gamma=0.0, bandwidth=0.2) == 1)


def test_density_weights_kde_reverses_cluster_size():
    rng = np.random.default_rng(6)
    centres = _unit(3, 32, seed=7)
    sizes = [40, 10, 2]
    pts = np.concatenate([c + 0.05 * rng.standard_normal((s, 32)) for c, s in zip(centres, sizes)])
    pts = (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)
    w = density_weights(classes=None, pooled=pts, gamma=1.0, bandwidth=0.2)
    assert w.shape == (52,) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    group = np.repeat([0, 1, 2], sizes)
    means = [w[group == g].mean() for g in range(3)]
    assert means[0] < means[1] < means[2]
    assert w[group == 2].min() > w[group == 1].max() > w[group == 0].max()
    # closed form for one point, computed independently
    cos = pts.astype(np.float64) @ pts.T.astype(np.float64)
    rho = np.exp(-((1 - cos) ** 2) / (2 * 0.2**2)).sum(1)
    np.testing.assert_allclose(w, rho.min() / rho, rtol=1e-5)


def _draw(table, rows, generator):
    """One neighbour per row as training draws it (``draw_slots``): (neighbour ids [B], psi [B])."""
    rows = np.asarray(rows, dtype=np.int64)
    slots = table.draw_slots(rows, generator)
    return table.indices[rows, slots], table.psi[rows, slots]


def _toy_set(seed: int = 8):
    """3 classes of sizes 6, 3, 1 with cluster structure in both caption and image space."""
    rng = np.random.default_rng(seed)
    sizes = {"many": 6, "mid": 3, "one": 1}
    classes = [c for c, s in sizes.items() for _ in range(s)]
    centres = {c: _unit(1, 16, seed=seed + i)[0] for i, c in enumerate(sizes)}
    pooled = np.stack([centres[c] + 0.3 * rng.standard_normal(16) for c in classes])
    pooled = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)
    feats = rng.standard_normal((len(classes), 12)).astype(np.float32)
    return pooled, feats, classes


def test_table_psi_is_the_product_of_its_factors():
    pooled, feats, classes = _toy_set()
    cfg = PsiConfig(pool="all", k=3, psi_max=2.0)
    table = build_neighbour_table(pooled, feats, cfg, classes=classes)
    n = len(classes)
    assert table.indices.shape == table.psi.shape == table.probs.shape == (n, 3)
    assert not np.any(table.indices == np.arange(n)[:, None])
    # s_txt / s_img from brute force
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    exp_txt = np.maximum(0, np.einsum("nd,nkd->nk", pooled, pooled[table.indices]))
    exp_img = np.maximum(0, np.einsum("nd,nkd->nk", unit, unit[table.indices]))
    np.testing.assert_allclose(table.s_txt, exp_txt, atol=1e-5)
    np.testing.assert_allclose(table.s_img, exp_img, atol=1e-5)
    expected = 2.0 * table.w_density[:, None] * exp_img * exp_txt
    expected[np.array(classes) == "one"] = 0.0  # a class of one has nothing to borrow from
    np.testing.assert_allclose(table.psi, expected, atol=1e-6)
    assert np.all(table.psi[np.array(classes) != "one"].max(axis=1) >= 0)
    np.testing.assert_allclose(table.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(table.probs, exp_txt / exp_txt.sum(1, keepdims=True), atol=1e-6)


def test_psi_is_monotone_in_each_factor_and_off_means_one():
    pooled, feats, classes = _toy_set()
    base_cfg = PsiConfig(pool="all", k=3, psi_max=1.0)
    base = build_neighbour_table(pooled, feats, base_cfg, classes=classes)
    assert base.psi.max() > 0
    # raising psi_max never lowers psi
    higher = build_neighbour_table(pooled, feats, dataclasses.replace(base_cfg, psi_max=3.0), classes=classes)
    assert np.all(higher.psi >= base.psi) and np.any(higher.psi > base.psi)
    # switching a factor off replaces it by 1: psi never drops, and equals the product of the rest
    for flag, factor in [("use_density", "w"), ("use_image_sim", "s_img"), ("use_text_sim", "s_txt")]:
        off = build_neighbour_table(pooled, feats, dataclasses.replace(base_cfg, **{flag: False}), classes=classes)
        np.testing.assert_array_equal(off.indices, base.indices)
        assert np.all(off.psi >= base.psi - 1e-7)
        parts = {"w": base.w_density[:, None], "s_img": base.s_img, "s_txt": base.s_txt}
        parts[factor] = np.ones_like(base.psi)
        expected = parts["w"] * parts["s_img"] * parts["s_txt"] * np.ones_like(base.psi)
        expected[np.array(classes) == "one"] = 0.0
        np.testing.assert_allclose(off.psi, expected, atol=1e-6)
    # raising a similarity (more aligned image features) never lowers psi
    aligned = feats.copy()
    aligned[base.indices[0, 0]] = 0.5 * feats[base.indices[0, 0]] + feats[0]
    raised = build_neighbour_table(pooled, aligned, base_cfg, classes=classes)
    assert raised.s_img[0, 0] > base.s_img[0, 0]
    assert raised.psi[0, 0] > base.psi[0, 0]
    # rarer class -> larger density weight -> larger psi for equal similarities
    assert base.w_density[np.array(classes) == "mid"].min() > base.w_density[np.array(classes) == "many"].max()


def test_rarity_psi_keeps_psi_only_below_the_median_class_size():
    pooled, feats, _ = _toy_set()
    classes = ["a"] * 5 + ["b"] * 3 + ["c"] * 2  # sizes 5, 3, 2: median 3, only "c" is below it
    cfg = PsiConfig(pool="all", k=3)
    base = build_neighbour_table(pooled, feats, cfg, classes=classes)
    rare = build_neighbour_table(pooled, feats, dataclasses.replace(cfg, rare_only=True), classes=classes)
    labels = np.array(classes)
    sizes = {c: int((labels == c).sum()) for c in set(classes)}
    median = float(np.median(list(sizes.values())))
    below = np.array([sizes[c] < median for c in classes])
    assert below.sum() == 2 and base.psi[below].max() > 0 and base.psi[~below].max() > 0
    np.testing.assert_array_equal(rare.psi[below], base.psi[below])
    assert np.all(rare.psi[~below] == 0)


def test_same_class_pool_never_crosses_classes():
    pooled, feats, classes = _toy_set()
    table = build_neighbour_table(pooled, feats, PsiConfig(k=4, pool="same_class"), classes=classes)
    labels = np.array(classes)
    for i in range(len(classes)):
        valid = table.indices[i] >= 0
        assert np.all(labels[table.indices[i][valid]] == labels[i])
        assert valid.sum() == min(4, (labels == labels[i]).sum() - 1)
        assert np.all(table.psi[i][~valid] == 0)
        if valid.any():
            assert np.all(table.probs[i][~valid] == 0)
    one = np.flatnonzero(labels == "one")[0]
    assert np.all(table.indices[one] == -1) and np.all(table.psi[one] == 0)
    ids, psi = _draw(table, np.arange(len(classes)).repeat(50), torch.Generator().manual_seed(0))
    src = labels[np.arange(len(classes)).repeat(50)]
    ok = ids >= 0
    assert np.all(labels[ids[ok]] == src[ok])
    assert np.all(psi[~ok] == 0) and np.all(src[~ok] == "one")
    with pytest.raises(ValueError, match="needs class labels"):
        build_neighbour_table(pooled, feats, PsiConfig(pool="same_class"))


def test_draw_slots_is_deterministic_and_matches_probs():
    pooled, feats, classes = _toy_set()
    table = build_neighbour_table(pooled, feats, PsiConfig(pool="all", k=3), classes=classes)
    rows = np.array([0, 4, 7])
    a = _draw(table, rows, torch.Generator().manual_seed(123))
    b = _draw(table, rows, torch.Generator().manual_seed(123))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    many = np.repeat(rows, 20_000)
    ids, psi = _draw(table, many, torch.Generator().manual_seed(7))
    for r in rows:
        picked = ids[many == r]
        freq = np.array([(picked == j).mean() for j in table.indices[r]])
        np.testing.assert_allclose(freq, table.probs[r], atol=0.015)
        lookup = dict(zip(table.indices[r], table.psi[r]))
        np.testing.assert_array_equal(psi[many == r], [lookup[j] for j in picked])
    nearest = build_neighbour_table(pooled, feats, PsiConfig(pool="all", k=3, sampling="nearest"), classes=classes)
    ids, _ = _draw(nearest, np.arange(10), torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(ids, nearest.indices[:, 0])


def test_table_config_errors():
    pooled, feats, classes = _toy_set()
    with pytest.raises(ValueError, match="unknown PsiConfig.sampling 'random'"):
        build_neighbour_table(pooled, feats, PsiConfig(pool="all", sampling="random"))
    with pytest.raises(ValueError, match="image_feats is None"):
        build_neighbour_table(pooled, None, PsiConfig(pool="all"))
    table = build_neighbour_table(pooled, None, PsiConfig(pool="all", use_image_sim=False))
    assert np.all(table.s_img == 1)
    with pytest.raises(ValueError, match="got 3 classes for 10"):
        build_neighbour_table(pooled, feats, PsiConfig(pool="all"), classes=classes[:3])


def test_image_features_uint8_and_latents():
    rng = np.random.default_rng(9)
    imgs = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    f = image_features(imgs, size=4)
    assert f.shape == (4, 48) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    # closed form: 4x4 block means, channel-major flatten, centre, normalise
    x = imgs.astype(np.float64).reshape(4, 4, 4, 4, 4, 3).mean(axis=(2, 4))  # [N, 4, 4, 3]
    flat = x.transpose(0, 3, 1, 2).reshape(4, -1)
    flat -= flat.mean(1, keepdims=True)
    np.testing.assert_allclose(f, flat / np.linalg.norm(flat, axis=1, keepdims=True), atol=1e-5)
    # brightness / contrast invariance, and the same image in model layout gives the same features
    brighter = np.clip(imgs.astype(np.int32) // 2 + 60, 0, 255).astype(np.uint8)
    cos = np.sum(image_features(brighter, size=4) * f, axis=1)
    assert np.all(cos > 0.99)
    chw = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(image_features(chw, size=4), f, atol=1e-5)
    lat = image_features(torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), size=2)
    assert lat.shape == (3, 16)
    # a constant image has no structure: zero vector
    assert np.all(image_features(np.full((1, 8, 8, 3), 7, np.uint8), size=2) == 0)


def test_other_class_pool_takes_the_nearest_captions_of_other_classes():
    pooled, feats, classes = _toy_set()
    labels = np.array(classes)
    table = build_neighbour_table(pooled, feats, PsiConfig(k=3, pool="other_class"), classes=classes)
    sims = pooled @ pooled.T
    for i in range(len(classes)):
        others = np.flatnonzero(labels != labels[i])
        want = others[np.argsort(-sims[i, others], kind="stable")[:3]]
        assert set(table.indices[i].tolist()) == set(want.tolist())
        np.testing.assert_allclose(table.s_txt[i], np.maximum(0, np.sort(sims[i, want])[::-1]), atol=1e-5)
    # every neighbour shows another subject, so every row with psi > 0 is informative
    informative = table.informative(classes, threshold=0.0)
    assert np.array_equal(informative, (table.psi > 0).any(axis=1))
    same = build_neighbour_table(pooled, feats, PsiConfig(k=3, pool="same_class"), classes=classes)
    assert not same.informative(classes, threshold=0.0).any()  # only rewordings of its own class
    with pytest.raises(ValueError, match="unknown PsiConfig.pool 'near'"):
        build_neighbour_table(pooled, feats, PsiConfig(pool="near"), classes=classes)


def test_pair_delta2_matches_brute_force_and_table_keeps_it():
    pooled, feats, classes = _toy_set()
    clean = np.random.default_rng(3).standard_normal((len(classes), 3, 4, 4)).astype(np.float32)
    table = build_neighbour_table(pooled, feats, PsiConfig(k=3, pool="all", schedule="gaussian"),
                                  classes=classes, clean=clean)
    for i in range(len(classes)):
        for s, j in enumerate(table.indices[i]):
            want = 0.0 if j < 0 else float(((clean[i] - clean[j]) ** 2).mean())
            assert table.delta2[i, s] == pytest.approx(want, rel=1e-5, abs=1e-7)
    ids = np.array([[1, -1], [0, 2], [0, 1]])
    assert pair_delta2(clean[:3], ids)[0, 1] == 0.0
    # without the images the table has no delta^2 (the trainer refuses the Gaussian schedule then)
    assert build_neighbour_table(pooled, feats, PsiConfig(pool="all"), classes=classes).delta2 is None


def _gaussian_reference(t: int, delta2: float, betas: np.ndarray) -> float:
    """beta_tilde_t / (beta_tilde_t + coef1_t^2 delta2), written from the betas in float64."""
    alphas = 1.0 - betas.astype(np.float64)
    abar = np.cumprod(alphas)
    abar_prev = 1.0 if t == 0 else abar[t - 1]
    beta_tilde = betas[t] * (1.0 - abar_prev) / (1.0 - abar[t])
    coef1 = np.sqrt(abar_prev) * betas[t] / (1.0 - abar[t])
    return beta_tilde / (beta_tilde + coef1**2 * delta2) if beta_tilde + coef1**2 * delta2 > 0 else 1.0


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "scaled_linear"])
def test_gaussian_psi_factor_matches_a_float64_reference(schedule):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    betas = sched.betas.double().numpy()
    t = torch.tensor([0, 1, 5, 50, 200, 500, 800, 999, 999, 10])
    delta2 = torch.tensor([0.3, 0.3, 0.1, 0.2, 0.5, 0.05, 1.0, 0.0, 2.0, 0.0])
    got = gaussian_psi_factor(t, delta2, sched.betas).numpy()
    want = [_gaussian_reference(int(a), float(b), betas) for a, b in zip(t, delta2)]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert got[0] == 0.0  # t = 0: beta_tilde = 0, the sample's own image decides
    assert got[7] == pytest.approx(1.0) and got[9] == pytest.approx(1.0)  # identical images: full precision
    # more different neighbours and less noise both lower psi
    hi_noise = gaussian_psi_factor(torch.tensor([800, 800]), torch.tensor([0.1, 0.5]), sched.betas)
    assert hi_noise[0] > hi_noise[1]
    lo_hi = gaussian_psi_factor(torch.tensor([5, 500]), torch.tensor([0.2, 0.2]), sched.betas)
    assert lo_hi[0] < lo_hi[1]


def test_expected_shift_is_the_distance_between_the_two_eps_targets():
    """For x_t made from x0, the eps targets of x0 and of a neighbour image x0' differ by
    sqrt(abar / (1 - abar)) (x0' - x0); its RMS times psi / (1 + psi) is the expected shift."""
    from pogdiff.method.neighbours import expected_shift

    betas = torch.linspace(1e-4, 0.02, 1000)
    abar = torch.cumprod(1 - betas.double(), 0)
    g = torch.Generator().manual_seed(0)
    x0, x0n, eps = (torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([5, 400, 990])
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target_nb = (x_t - a.sqrt() * x0n) / (1 - a).sqrt()
    rms = ((target_nb - eps) ** 2).mean(dim=(1, 2, 3)).sqrt()
    delta2 = ((x0n - x0) ** 2).mean(dim=(1, 2, 3))
    psi = torch.tensor([0.5, 1.0, 3.0])
    np.testing.assert_allclose(expected_shift(psi, t, delta2, betas).numpy(), (psi / (1 + psi) * rms).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(expected_shift(psi, t, None, betas).numpy(), (psi / (1 + psi)).numpy(), rtol=1e-6)


def test_neighbour_pass_rows_keep_the_largest_shifts_within_the_share():
    from pogdiff.method.neighbours import neighbour_pass_rows

    psi = torch.tensor([0.0, 0.5, 0.2, 0.9, 0.04, 0.3])
    shift = torch.tensor([9.0, 0.1, 0.7, 0.3, 5.0, 0.7])
    everyone = neighbour_pass_rows(psi, shift, threshold=0.05, share=1.0)
    assert everyone.tolist() == [False, True, True, True, False, True]  # psi above the threshold
    half = neighbour_pass_rows(psi, shift, threshold=0.05, share=0.5)  # at most 3 of 6 rows
    assert half.tolist() == [False, False, True, True, False, True]  # 0.7, 0.7 (earlier row first), 0.3
    third = neighbour_pass_rows(psi, shift, threshold=0.05, share=0.3)  # ceil(1.8) = 2 rows
    assert third.tolist() == [False, False, True, False, False, True]
    # rows below the threshold never run, however large their shift
    assert not neighbour_pass_rows(psi, shift, threshold=0.05, share=0.2)[0]
