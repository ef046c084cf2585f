"""T2H's head-to-tail target transfer (pogdiff/method/losses.py, pogdiff/method/objectives.py) against float64
references written from its definition (README "The method")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pogdiff.method import losses
from pogdiff.config import TrainConfig
from pogdiff.method.objectives import T2H, Batch, ModelAccess, objective_for


def _reference_log_weights(x0: np.ndarray, eps: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """Written from the definition, one pair at a time, in float64."""
    n = len(x0)
    out = np.empty((n, n))
    for i in range(n):
        sigma2 = 1.0 / abar[i] - 1.0
        point = x0[i] + np.sqrt(sigma2) * eps[i]
        for j in range(n):
            out[i, j] = -np.sum((point - x0[j]) ** 2) / (2.0 * sigma2)
    return out


def test_log_weights_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01])
    got = losses.t2h_log_weights(x0, eps, abar).numpy()
    want = _reference_log_weights(x0.double().numpy(), eps.double().numpy(), abar.double().numpy())
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_own_row_dominates_at_low_noise_and_rows_mix_at_high_noise():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    low = torch.softmax(losses.t2h_log_weights(x0, eps, torch.full((6,), 0.9999)), dim=1)
    high = torch.softmax(losses.t2h_log_weights(x0, eps, torch.full((6,), 1e-4)), dim=1)
    assert float(low.diagonal().min()) > 0.999
    assert float(high.diagonal().max()) < 0.5  # at abar 1e-4 the rows are nearly exchangeable


def test_transferred_target_is_the_noise_that_maps_the_source_to_x_t():
    g = torch.Generator().manual_seed(2)
    x0, eps, src = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    abar = torch.tensor([0.99, 0.7, 0.3, 0.05])
    a = abar.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    np.testing.assert_allclose(losses.transferred_target(x_t, x0, abar).numpy(), eps.numpy(), atol=1e-5)
    target = losses.transferred_target(x_t, src, abar)
    np.testing.assert_allclose((a.sqrt() * src + (1 - a).sqrt() * target).numpy(), x_t.numpy(), atol=1e-5)


def _predict(x_t, t, rows, drop):
    return x_t * 0.5


def _run(class_count, rows, drop, t, seed=3):
    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    x0, eps = torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 3, 4, 4, generator=g)
    betas = torch.linspace(1e-4, 0.02, 1000)
    abar = torch.cumprod(1 - betas.double(), 0)[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    access = ModelAccess(predict=_predict, balanced_rows=None, table=None, betas=betas, num_timesteps=1000,
                         class_count=torch.as_tensor(class_count))
    batch = Batch(rows=torch.as_tensor(rows), x0=x0, t=t, eps=eps, drop=drop).on("cpu")
    terms, stats = T2H().terms(access, batch, x_t, torch.Generator().manual_seed(seed + 100))
    return terms, stats, x0, eps, x_t, abar


def test_the_objective_draws_from_the_weights_and_transfers_head_to_tail_only():
    """Row 0 is the only tail row; at the noisiest timestep every row's source is nearly uniform."""
    b = 8
    count = [2] + [50] * 7  # data rows: 0 is rare, the rest frequent
    rows, drop, t = list(range(b)), torch.zeros(b, dtype=torch.bool), torch.full((b,), 999)
    terms, stats, x0, eps, x_t, abar = _run(count, rows, drop, t)
    # Replay the draw by hand: same generator, float64 weights.
    w = torch.softmax(torch.as_tensor(_reference_log_weights(
        x0.double().numpy(), eps.double().numpy(), abar.flatten().double().numpy())), dim=1)
    source = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(103)).squeeze(1)
    cnt = torch.as_tensor(count)
    accept = (source != torch.arange(b)) & (cnt[source] >= cnt)
    source = torch.where(accept, source, torch.arange(b))
    target = (x_t - abar.sqrt() * x0[source]) / (1 - abar).sqrt()
    want = ((x_t * 0.5 - target) ** 2).reshape(b, -1).mean(1)
    np.testing.assert_allclose(terms["loss"].numpy(), want.numpy(), rtol=1e-5)
    assert stats["transfer_rate"] == pytest.approx(float(accept.float().mean()))
    assert stats["transfer_rate"] > 0


def test_a_frequent_row_never_takes_a_rare_rows_target_and_dropped_rows_keep_their_own():
    b = 8
    count = [2] * 4 + [50] * 4
    transferred = 0
    for seed in range(20):
        drop = torch.tensor([False, True, False, False, False, False, True, False])
        terms, stats, x0, eps, x_t, abar = _run(count, list(range(b)), drop, torch.full((b,), 999), seed=seed)
        # the loss each row would have with each possible source row: [row, source]
        per_source = torch.stack([((x_t * 0.5 - (x_t - abar.sqrt() * x0[j]) / (1 - abar).sqrt()) ** 2)
                                  .reshape(b, -1).mean(1) for j in range(b)], dim=1)
        source = torch.isclose(per_source, terms["loss"][:, None], rtol=1e-5).float().argmax(1)
        assert bool(torch.isclose(per_source[torch.arange(b), source], terms["loss"], rtol=1e-5).all())
        assert source[1] == 1 and source[6] == 6  # dropped captions keep their own noise
        assert bool((source[4:] >= 4).all())  # frequent rows only from frequent rows
        transferred += int((source != torch.arange(b)).sum())
        assert stats["transfer_rate"] == pytest.approx(float((source != torch.arange(b)).float().mean()))
    assert transferred > 0


def test_t2h_is_a_method_on_tempered_batches():
    from pogdiff.config import RECIPES, uses_balanced_sampling

    cfg = TrainConfig(method="t2h")
    assert isinstance(objective_for(cfg), T2H) and uses_balanced_sampling(cfg)
    assert "method=t2h" in RECIPES["t2h"]


def test_t2h_without_class_sizes_is_refused_in_words():
    access = ModelAccess(predict=_predict, balanced_rows=None, table=None, betas=torch.linspace(1e-4, 0.02, 1000),
                         num_timesteps=1000)
    batch = Batch(rows=torch.arange(2), x0=torch.zeros(2, 3, 2, 2), t=torch.tensor([1, 2]), eps=torch.zeros(2, 3, 2, 2),
                  drop=torch.zeros(2, dtype=bool)).on("cpu")
    with pytest.raises(ValueError, match="needs each row's class size"):
        T2H().terms(access, batch, torch.zeros(2, 3, 2, 2), torch.Generator())
