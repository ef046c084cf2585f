"""Pins the math of pogdiff.method.losses: closed forms, gradients, stop-gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pogdiff.method.losses import cbdm_loss, mean_flat, mse_loss, pog_target, pogdiff_loss

SHAPE = (6, 3, 4, 4)


def _batch(seed: int = 0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    eps_pred = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    eps_nb = torch.randn(shape, generator=g)
    psi = torch.tensor([0.0, 0.3, 1.0, 0.0, 2.5, 7.0])
    return eps_pred, eps, eps_nb, psi


def test_mse_loss_matches_numpy():
    eps_pred, eps, _, _ = _batch()
    terms = mse_loss(eps_pred, eps)
    expected = ((eps_pred.numpy() - eps.numpy()) ** 2).reshape(SHAPE[0], -1).mean(1)
    assert set(terms) == {"loss", "mse"}
    assert terms["loss"].shape == (SHAPE[0],)
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("form", ["two_term", "mix"])
def test_psi_zero_rows_equal_plain_loss_exactly(form):
    eps_pred, eps, eps_nb, psi = _batch()
    zero = psi == 0
    eps_nb[zero] = float("nan")  # a skipped neighbour forward pass must not leak
    eps_pred.requires_grad_(True)
    terms = pogdiff_loss(eps_pred, eps, eps_nb, psi, form=form)
    plain = mse_loss(eps_pred, eps)["loss"]
    assert set(terms) == {"loss", "mse", "pog"}
    assert all(v.shape == (SHAPE[0],) for v in terms.values())
    assert torch.equal(terms["loss"][zero], plain[zero])
    assert torch.equal(terms["pog"][zero], torch.zeros(int(zero.sum())))
    terms["loss"].sum().backward()
    assert torch.isfinite(eps_pred.grad).all()
    # all-zero psi: the whole loss is the plain loss
    all_zero = pogdiff_loss(eps_pred, eps, eps_nb, torch.zeros(SHAPE[0]), form=form)["loss"]
    assert torch.equal(all_zero, plain)


def test_two_term_is_mse_plus_weighted_neighbour_distance():
    eps_pred, eps, eps_nb, psi = _batch(1)
    terms = pogdiff_loss(eps_pred, eps, eps_nb, psi, form="two_term")
    p, e, n = (x.double().numpy().reshape(SHAPE[0], -1) for x in (eps_pred, eps, eps_nb))
    expected = ((p - e) ** 2).mean(1) + psi.double().numpy() * ((p - n) ** 2).mean(1)
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["pog"])


def _grad(fn, eps_pred):
    x = eps_pred.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def test_two_forms_have_equal_gradients_and_differ_by_a_constant():
    eps_pred, eps, eps_nb, psi = _batch(2)
    g_two = _grad(lambda x: pogdiff_loss(x, eps, eps_nb, psi, form="two_term")["loss"], eps_pred)
    g_mix = _grad(lambda x: pogdiff_loss(x, eps, eps_nb, psi, form="mix")["loss"], eps_pred)
    torch.testing.assert_close(g_two, g_mix, rtol=1e-5, atol=1e-6)
    # both are (1 + psi) times the gradient of plain regression onto eps*
    target = pog_target(eps, eps_nb, psi)
    g_star = _grad(lambda x: mean_flat((x - target) ** 2), eps_pred)
    torch.testing.assert_close(g_two, (1 + psi).view(-1, 1, 1, 1) * g_star, rtol=1e-5, atol=1e-6)
    # the gradient is not trivially the plain one where psi > 0
    g_plain = _grad(lambda x: mse_loss(x, eps)["loss"], eps_pred)
    assert not torch.allclose(g_two[psi > 0], g_plain[psi > 0])

    # loss difference = psi / (1 + psi) * ||eps - n||^2, the same for any eps_pred
    const = psi / (1 + psi) * mean_flat((eps - eps_nb) ** 2)
    for other_pred in (eps_pred, torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)) * 3):
        two = pogdiff_loss(other_pred, eps, eps_nb, psi, form="two_term")
        mix = pogdiff_loss(other_pred, eps, eps_nb, psi, form="mix")
        torch.testing.assert_close(two["loss"] - mix["loss"], const, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two["mse"], mix["mse"])
        torch.testing.assert_close(two["pog"], mix["pog"])


def _linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """The DDPM (Ho et al. 2020) linear schedule, float64."""
    return np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)


def test_pog_target_is_the_product_of_two_gaussians_in_mu_space():
    """Independent float64 check: posterior mean from x_0 (not from eps), product mean, back to eps."""
    rng = np.random.default_rng(3)
    betas = _linear_betas()
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    n, d = 5, 12
    t = np.array([1, 10, 200, 600, 999])
    x0 = rng.standard_normal((n, d))
    eps = rng.standard_normal((n, d)).astype(np.float32).astype(np.float64)
    eps_nb = rng.standard_normal((n, d)).astype(np.float32).astype(np.float64)
    psi = np.array([0.05, 0.5, 1.0, 3.0, 20.0])

    ab, ab_prev, beta, alpha = abar[t, None], abar[t - 1, None], betas[t, None], alphas[t, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    # DDPM posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)
    c0 = beta * np.sqrt(ab_prev) / (1 - ab)
    ct = (1 - ab_prev) * np.sqrt(alpha) / (1 - ab)
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    mu_tilde = c0 * x0 + ct * x_t
    # neighbour Gaussian: the same posterior with x_0 predicted from eps_nb, variance beta_tilde / psi
    x0_nb = (x_t - np.sqrt(1 - ab) * eps_nb) / np.sqrt(ab)
    mu_nb = c0 * x0_nb + ct * x_t
    v1, v2 = beta_tilde, beta_tilde / psi[:, None]
    mu_prod = (mu_tilde / v1 + mu_nb / v2) / (1 / v1 + 1 / v2)
    # invert mu = c0 * (x_t - sqrt(1-abar) e) / sqrt(abar) + ct * x_t for e
    eps_prod = ((c0 / np.sqrt(ab) + ct) * x_t - mu_prod) * np.sqrt(ab) / (c0 * np.sqrt(1 - ab))

    got = pog_target(torch.tensor(eps, dtype=torch.float32), torch.tensor(eps_nb, dtype=torch.float32),
                     torch.tensor(psi, dtype=torch.float32))
    assert got.dtype == torch.float32 and got.shape == (n, d)
    np.testing.assert_allclose(got.numpy(), eps_prod, rtol=1e-4, atol=2e-5)
    # the reference moved away from eps, so the comparison above is not vacuous
    assert not np.allclose(eps_prod, eps, atol=1e-2)


@pytest.mark.parametrize("form", ["two_term", "mix"])
def test_no_gradient_flows_into_neighbour_prediction(form):
    eps_pred, eps, eps_nb, psi = _batch(4)
    eps_pred.requires_grad_(True)
    eps_nb.requires_grad_(True)
    pogdiff_loss(eps_pred, eps, eps_nb, psi, form=form)["loss"].sum().backward()
    assert eps_nb.grad is None
    assert eps_pred.grad is not None and eps_pred.grad.abs().sum() > 0
    out = pog_target(eps, eps_nb, psi)
    assert not out.requires_grad


def test_cbdm_hand_computed_values_and_gradients():
    p = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    eps = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    pb = torch.tensor([[1.0, 0.0], [2.0, 1.0]], requires_grad=True)
    t = torch.tensor([500, 100])
    terms = cbdm_loss(p, eps, pb, t, 1000, tau=2.0)
    # mse: (1+4)/2 = 2.5 both rows; weights tau*t/T = 1.0, 0.2
    # row 0: ||p-pb||^2 = (0+4)/2 = 2 -> (1 + 1/4) * 2 = 2.5 -> cbdm 2.5
    # row 1: ||p-pb||^2 = (4+4)/2 = 4 -> 5 -> cbdm 1.0
    torch.testing.assert_close(terms["mse"], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(terms["cbdm"], torch.tensor([2.5, 1.0]))
    torch.testing.assert_close(terms["loss"], torch.tensor([5.0, 3.5]))
    terms["loss"].sum().backward()
    # d/dp = (p - eps) + w (p - pb)         (first reg term only; second has sg(p))
    torch.testing.assert_close(p.grad, torch.tensor([[1.0, 4.0], [-1.4, -2.4]]))
    # d/dpb = w/4 (pb - p)                   (second reg term only; first has sg(pb))
    torch.testing.assert_close(pb.grad, torch.tensor([[0.0, -0.5], [0.1, 0.1]]))


def test_cbdm_stop_gradients_against_autograd_of_manual_formula():
    g = torch.Generator().manual_seed(5)
    p, eps, pb = (torch.randn(4, 2, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    tau, big_t = 0.7, 1000
    w = (tau * t / big_t).view(-1, 1, 1)
    d = p[0].numel()
    x, xb = p.clone().requires_grad_(True), pb.clone().requires_grad_(True)
    cbdm_loss(x, eps, xb, t, big_t, tau=tau)["loss"].sum().backward()
    torch.testing.assert_close(x.grad, 2 * (p - eps) / d + w * 2 * (p - pb) / d)
    torch.testing.assert_close(xb.grad, w * 0.25 * 2 * (pb - p) / d)
    # t = 0 row is the plain loss
    assert torch.equal(cbdm_loss(p, eps, pb, t, big_t, tau=tau)["loss"][0], mse_loss(p, eps)["loss"][0])


def test_bad_inputs_raise_with_message():
    eps_pred, eps, eps_nb, psi = _batch()
    with pytest.raises(ValueError, match="eps_neighbour has shape"):
        pogdiff_loss(eps_pred, eps, eps_nb[:, :2], psi)
    with pytest.raises(ValueError, match=r"psi must have shape \[6\]"):
        pogdiff_loss(eps_pred, eps, eps_nb, psi[:3])
    with pytest.raises(ValueError, match="unknown PoGDiff form 'bogus'"):
        pogdiff_loss(eps_pred, eps, eps_nb, psi, form="bogus")
    with pytest.raises(ValueError, match="psi must be >= 0"):
        pogdiff_loss(eps_pred, eps, eps_nb, -psi - 1)
    with pytest.raises(ValueError, match="eps has shape"):
        mse_loss(eps_pred, eps[:2])
    with pytest.raises(ValueError, match="num_timesteps must be positive"):
        cbdm_loss(eps_pred, eps, eps_nb, torch.zeros(6), 0, tau=1.0)
