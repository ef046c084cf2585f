"""Each objective's forward pass (pogdiff/method/objectives.py) against the loss formulas by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pogdiff.method import losses
from pogdiff.config import PsiConfig, TrainConfig
from pogdiff.method.neighbours import NeighbourTable
from pogdiff.method.objectives import CBDM, Batch, ModelAccess, Objective, PoGDiff, objective_for


def _table(psi: np.ndarray) -> NeighbourTable:
    n = psi.shape[0]
    indices = (np.arange(n)[:, None] + 1 + np.arange(psi.shape[1])[None, :]) % n
    probs = np.full(psi.shape, 1.0 / psi.shape[1])
    ones = np.ones(psi.shape, np.float32)
    return NeighbourTable(indices=indices.astype(np.int64), s_txt=ones, s_img=ones, w_density=np.ones(n, np.float32),
                          psi=psi.astype(np.float32), probs=probs, config=PsiConfig())


class _Model:
    """eps prediction = x_t * (1 + row) + t/1000: each caption row predicts something different."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, x_t, t, rows, drop):
        rows = torch.as_tensor(rows)
        self.calls.append(rows.tolist())
        scale = (1.0 + rows.float()).view(-1, 1, 1, 1)
        if drop is not None:
            scale = torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(scale), scale)
        return x_t * scale + t.float().view(-1, 1, 1, 1) / 1000


def _batch(b=4):
    """A batch on the CPU (its device copies are itself) and a noised input."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(b, 3, 4, 4, generator=g)
    batch = Batch(rows=torch.arange(b), x0=torch.zeros_like(eps), t=torch.tensor([10, 200, 500, 900])[:b], eps=eps,
                  drop=torch.tensor([False, False, False, True])[:b])
    return batch.on("cpu"), torch.randn(b, 3, 4, 4, generator=g)


def _access(model, table=None):
    return ModelAccess(predict=model, balanced_rows=lambda b, g: torch.full((b,), 5), table=table,
                       betas=torch.linspace(1e-4, 0.02, 1000), num_timesteps=1000)


def test_baseline_is_eps_mse():
    batch, x_t = _batch()
    model = _Model()
    terms, stats = Objective().terms(_access(model), batch, x_t, torch.Generator().manual_seed(1))
    expected = losses.mse_loss(model(x_t, batch.t, batch.rows, batch.drop), batch.eps)
    assert torch.equal(terms["loss"], expected["loss"]) and stats == {}


def test_cbdm_regularises_towards_a_balanced_rows_prediction():
    batch, x_t = _batch()
    model = _Model()
    terms, _ = CBDM(tau=0.5).terms(_access(model), batch, x_t, torch.Generator().manual_seed(1))
    assert model.calls[1] == [5, 5, 5, 5]  # the balanced rows' prediction, no caption dropout
    ref = losses.cbdm_loss(model(x_t, batch.t, batch.rows, batch.drop), batch.eps,
                           model(x_t, batch.t, torch.full((4,), 5), None), batch.t, 1000, tau=0.5)
    # rows 0-2 carry the regulariser; row 3's caption was dropped: plain loss there, as CBDM's authors train
    assert torch.allclose(terms["loss"][:3], ref["loss"][:3])
    assert torch.equal(terms["cbdm"][3], torch.tensor(0.0)) and torch.allclose(terms["loss"][3], ref["mse"][3])
    assert bool((ref["cbdm"][3] > 0))  # so the zero above is the rule, not the data


def test_pogdiff_uses_the_neighbours_prediction_only_above_the_threshold():
    psi = np.array([[0.9], [0.05], [0.5], [0.9]], np.float32)  # one neighbour per row: row + 1
    batch, x_t = _batch()
    model = _Model()
    terms, stats = PoGDiff("constant", 0.1).terms(_access(model, _table(psi)), batch, x_t,
                                                               torch.Generator().manual_seed(1))
    # row 1 is under the threshold and row 3 is caption-dropped: neighbours of rows 0 and 2 only
    assert model.calls[1] == [1, 3] and stats["psi_active"] == 0.5
    want_psi = torch.tensor([0.9, 0.0, 0.5, 0.0])
    assert stats["psi_mean"] == pytest.approx(float(want_psi.mean()))
    eps_pred = model(x_t, batch.t, batch.rows, batch.drop)
    eps_nb = torch.zeros_like(eps_pred)
    eps_nb[[0, 2]] = model(x_t[[0, 2]], batch.t[[0, 2]], torch.tensor([1, 3]), None)
    ref = losses.pogdiff_loss(eps_pred, batch.eps, eps_nb, want_psi)
    assert torch.allclose(terms["loss"], ref["loss"])


def test_a_neighbour_share_keeps_the_pass_for_the_rows_that_move_most():
    """Constant psi: the expected shift is psi / (1 + psi), so with room for 1 row of 4
    (share 0.25) only row 0 (psi 0.9; row 3 is caption-dropped) runs the neighbour pass."""
    psi = np.array([[0.9], [0.3], [0.5], [0.9]], np.float32)
    batch, x_t = _batch()
    model = _Model()
    terms, stats = PoGDiff("constant", 0.05, neighbour_share=0.25).terms(_access(model, _table(psi)), batch, x_t,
                                                                         torch.Generator().manual_seed(1))
    assert model.calls[1] == [1] and stats["psi_active"] == 0.25
    want_psi = torch.tensor([0.9, 0.0, 0.0, 0.0])
    eps_pred = model(x_t, batch.t, batch.rows, batch.drop)
    eps_nb = torch.zeros_like(eps_pred)
    eps_nb[[0]] = model(x_t[[0]], batch.t[[0]], torch.tensor([1]), None)
    assert torch.allclose(terms["loss"], losses.pogdiff_loss(eps_pred, batch.eps, eps_nb, want_psi)["loss"])
    with pytest.raises(ValueError, match="neighbour_share"):
        TrainConfig(psi=PsiConfig(neighbour_share=0.0))


def test_a_base_teacher_builds_the_target_from_its_own_prediction_float64_reference():
    """PoG target with the frozen teacher: loss = ||p - eps||^2 + psi * ||p - teacher(x_t, y')||^2,
    written here in float64 from the teacher's prediction; the live model is not asked for y'."""
    psi = np.array([[0.9], [0.3], [0.5], [0.9]], np.float32)
    batch, x_t = _batch()
    live, teacher_calls = _Model(), []

    def teacher(x, t, rows, drop):
        teacher_calls.append(torch.as_tensor(rows).tolist())
        return 0.5 * x - 0.1  # not what the live model predicts for any caption

    access = ModelAccess(predict=live, balanced_rows=lambda b, g: torch.full((b,), 5), table=_table(psi),
                         betas=torch.linspace(1e-4, 0.02, 1000), num_timesteps=1000, predict_teacher=teacher)
    terms, _ = PoGDiff("constant", 0.1, "base").terms(access, batch, x_t, torch.Generator().manual_seed(1))
    assert live.calls == [[0, 1, 2, 3]] and teacher_calls == [[1, 2, 3]]  # row 3 is caption-dropped
    p = live(x_t, batch.t, batch.rows, batch.drop).double()
    n = (0.5 * x_t - 0.1).double()
    w = torch.tensor([0.9, 0.3, 0.5, 0.0], dtype=torch.float64)
    flat = lambda v: v.reshape(4, -1).mean(1)  # noqa: E731
    want = flat((p - batch.eps.double()) ** 2) + w * flat((p - n) ** 2)
    np.testing.assert_allclose(terms["loss"].double().numpy(), want.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="psi teacher 'base' needs the frozen base weights"):
        PoGDiff("constant", 0.1, "base").terms(_access(_Model(), _table(psi)), batch, x_t, torch.Generator().manual_seed(1))


def test_objective_for_each_method():
    assert type(objective_for(TrainConfig(method="baseline"))) is Objective
    assert type(objective_for(TrainConfig(method="resample"))) is Objective
    assert isinstance(objective_for(TrainConfig(method="cbdm")), CBDM)
    assert isinstance(objective_for(TrainConfig(method="pogdiff")), PoGDiff)
    with pytest.raises(ValueError, match="needs a neighbour table"):
        batch, x_t = _batch()
        PoGDiff("constant", 0.1).terms(_access(_Model()), batch, x_t, torch.Generator())
