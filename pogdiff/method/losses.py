"""Pure loss functions: eps-MSE, PoGDiff (two equivalent forms), CBDM and T2H's transferred target,
and the per-timestep weights of the eps-space losses (:func:`eps_loss_weights`).

Every function takes tensors and returns a dict of named per-sample terms, each of shape
``[N]``; ``terms["loss"]`` is the per-sample total that the trainer averages (README "The method").
Squared norms are means over the non-batch dimensions (``mean_flat``), as in DDPM's simple loss.

Derivation of the PoGDiff target (README "The method"). With
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` the DDPM posterior mean and the model mean are
both affine in an eps-prediction::

    mu(x_t, e) = (x_t - beta_t / sqrt(1 - abar_t) * e) / sqrt(alpha_t)

so ``mu_tilde = mu(x_t, eps)`` and ``mu_theta(x_t, y') = mu(x_t, eps_theta(x_t, t, y'))``.
The product ``N(mu_tilde, beta_tilde I) * N(mu_theta(x_t, y'), sigma'^2 I)`` is (up to
normalisation) the Gaussian with the precision-weighted mean::

    mu* = (mu_tilde / beta_tilde + mu_theta / sigma'^2) / (1 / beta_tilde + 1 / sigma'^2)
        = (mu_tilde + psi * mu_theta) / (1 + psi),        psi = beta_tilde / sigma'^2

and, because ``mu`` is affine in ``e`` with the same coefficients for both factors,
``mu* = mu(x_t, eps*)`` with ``eps* = (eps + psi * sg(eps_theta(x_t, t, y'))) / (1 + psi)``.
Expanding the squares gives the two forms (``p = eps_theta(x_t, t, y)``, ``n = sg(eps_theta(x_t, t, y'))``)::

    ||p - eps||^2 + psi * ||p - n||^2  =  (1 + psi) * ||p - eps*||^2 + psi / (1 + psi) * ||eps - n||^2

The last term does not depend on ``p``: the two forms have identical gradients with respect to
``p``, and both are ``(1 + psi)`` times the gradient of the plain regression onto ``eps*``.
"""

from __future__ import annotations

import torch
from torch import Tensor

POG_FORMS = ("two_term", "mix")
# CBDM weight of the second (balanced-branch) regulariser (README "The method": 1/4).
CBDM_COMMITMENT = 0.25


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: ``[N, ...] -> [N]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"{name_a} must be a non-empty [N, ...] batch, got shape {tuple(a.shape)}")


def _per_sample(name: str, value: Tensor | float, like: Tensor) -> Tensor:
    """A per-sample scalar as float32 ``[N]`` on ``like``'s device (python scalars broadcast)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.shape != (like.shape[0],):
        raise ValueError(f"{name} must have shape [{like.shape[0]}], got {tuple(value.shape)}")
    return value


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """``[N] -> [N, 1, 1, ...]`` so it broadcasts against ``like`` of shape ``[N, ...]``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def mse_loss(eps_pred: Tensor, eps: Tensor) -> dict[str, Tensor]:
    """Plain DDPM loss ``||eps_theta(x_t, t, y) - eps||^2``.

    :param eps_pred: the [N x ...] model prediction.
    :param eps: the [N x ...] noise that was added.
    :return: ``{"loss", "mse"}``, each float32 ``[N]`` (here equal).
    """
    _check_pair("eps_pred", eps_pred, "eps", eps)
    mse = mean_flat((eps_pred.float() - eps.float()) ** 2)
    return {"loss": mse, "mse": mse}


def pog_target(eps: Tensor, eps_neighbour: Tensor, psi: Tensor | float) -> Tensor:
    """PoGDiff target ``eps* = (eps + psi * sg(eps_nb)) / (1 + psi)`` (README "The method").

    :param eps: the [N x ...] noise that was added.
    :param eps_neighbour: the [N x ...] model prediction for the neighbour caption (detached here).
    :param psi: [N] (or a scalar) relative precision of the neighbour, ``psi >= 0``.
    :return: float32 [N x ...] target.
    """
    _check_pair("eps", eps, "eps_neighbour", eps_neighbour)
    psi = bcast(_per_sample("psi", psi, eps), eps)
    return (eps.float() + psi * eps_neighbour.detach().float()) / (1.0 + psi)


def pogdiff_loss(
    eps_pred: Tensor,
    eps: Tensor,
    eps_neighbour: Tensor,
    psi: Tensor | float,
    *,
    form: str = "two_term",
) -> dict[str, Tensor]:
    """PoGDiff loss in one of two forms with identical gradients w.r.t. ``eps_pred`` (README "The method").

    ``"two_term"``: ``||p - eps||^2 + psi * ||p - sg(n)||^2``.
    ``"mix"``: ``(1 + psi) * ||p - eps*||^2``; it equals ``"two_term"`` minus
    ``psi / (1 + psi) * ||eps - n||^2``, a constant in ``p``.

    ``eps_neighbour`` is always detached. Rows with ``psi == 0`` ignore ``eps_neighbour``
    entirely (the trainer may leave them unfilled) and equal :func:`mse_loss` exactly.

    :param eps_pred: the [N x ...] model prediction for the sample's own caption.
    :param eps: the [N x ...] noise that was added.
    :param eps_neighbour: the [N x ...] prediction for the neighbour caption.
    :param psi: [N] (or a scalar) per-sample psi, ``psi >= 0``.
    :param form: ``"two_term"`` or ``"mix"``.
    :return: ``{"loss", "mse", "pog"}``, each float32 ``[N]``; ``"pog"`` is
        ``psi * ||p - sg(n)||^2``, reported for logging in both forms (``"two_term"``: loss = mse + pog).
    """
    if form not in POG_FORMS:
        raise ValueError(f"unknown PoGDiff form {form!r}; choose one of {', '.join(POG_FORMS)}")
    _check_pair("eps_pred", eps_pred, "eps", eps)
    _check_pair("eps_pred", eps_pred, "eps_neighbour", eps_neighbour)
    psi = _per_sample("psi", psi, eps_pred)
    if bool((psi < 0).any()):
        raise ValueError(f"psi must be >= 0, got min {psi.min().item():.4g}")
    active = bcast(psi > 0, eps)
    # Rows with psi == 0 borrow nothing: substitute eps so a skipped (NaN / garbage) neighbour
    # cannot leak into the loss or its gradient.
    eps_nb = torch.where(active, eps_neighbour.detach().float(), eps.float())
    pred = eps_pred.float()
    mse = mean_flat((pred - eps.float()) ** 2)
    if form == "two_term":
        pog = psi * mean_flat((pred - eps_nb) ** 2)
        return {"loss": mse + pog, "mse": mse, "pog": pog}
    target = pog_target(eps, eps_nb, psi)
    loss = (1.0 + psi) * mean_flat((pred - target) ** 2)
    with torch.no_grad():
        pog = psi * mean_flat((pred - eps_nb) ** 2)
    return {"loss": loss, "mse": mse.detach(), "pog": pog}


def cbdm_loss(
    eps_pred: Tensor,
    eps: Tensor,
    eps_pred_balanced: Tensor,
    t: Tensor,
    num_timesteps: int,
    *,
    tau: float | Tensor,
) -> dict[str, Tensor]:
    """Class-Balancing Diffusion loss (Qin et al., CVPR 2023) adapted to captions (README "The method").

    ``L = ||p - eps||^2 + tau * t/T * (||p - sg(p_b)||^2 + 1/4 * ||sg(p) - p_b||^2)``
    with ``p = eps_theta(x_t, t, y)`` and ``p_b = eps_theta(x_t, t, y_b)`` for a caption ``y_b``
    of a uniformly drawn class. Both ``p`` and ``p_b`` carry gradient (each through one term).

    :param eps_pred: the [N x ...] prediction for the sample's caption.
    :param eps: the [N x ...] noise that was added.
    :param eps_pred_balanced: the [N x ...] prediction for the balanced caption ``y_b``.
    :param t: [N] timesteps in ``[0, num_timesteps)``.
    :param num_timesteps: T, the number of diffusion steps.
    :param tau: regulariser weight, a scalar or ``[N]`` (0 for rows without the regulariser).
    :return: ``{"loss", "mse", "cbdm"}``, each float32 ``[N]``; loss = mse + cbdm.
    """
    _check_pair("eps_pred", eps_pred, "eps", eps)
    _check_pair("eps_pred", eps_pred, "eps_pred_balanced", eps_pred_balanced)
    if num_timesteps <= 0:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    weight = _per_sample("tau", tau, eps_pred) * _per_sample("t", t, eps_pred) / num_timesteps
    pred, pred_b = eps_pred.float(), eps_pred_balanced.float()
    mse = mean_flat((pred - eps.float()) ** 2)
    reg = mean_flat((pred - pred_b.detach()) ** 2) + CBDM_COMMITMENT * mean_flat((pred.detach() - pred_b) ** 2)
    cbdm = weight * reg
    return {"loss": mse + cbdm, "mse": mse, "cbdm": cbdm}


def t2h_log_weights(x0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """T2H's log-weights of every batch row ``j`` as the source of row ``i``'s noised input
    (Zhang et al., ICLR 2024; README "The method")::

        log w[i, j] = -||x0_i + sigma_i * eps_i - x0_j||^2 / (2 sigma_i^2),   sigma_i^2 = 1 / abar_i - 1

    ``x_t,i / sqrt(abar_i) = x0_i + sigma_i eps_i``, so ``w[i, :]`` normalised is the posterior over
    which row of the batch produced ``x_t,i``, the batch standing in for the data distribution.
    The squared norm is a sum over all non-batch dimensions (a density, not a per-pixel mean).

    :param x0: the [N x ...] clean inputs of the batch.
    :param eps: the [N x ...] noise added to them.
    :param abar: [N] cumulative alpha of each row's timestep, in (0, 1).
    :return: float64 [N x N] log-weights (row ``i``: the candidates for row ``i``).
    """
    _check_pair("x0", x0, "eps", eps)
    abar = _per_sample("abar", abar, x0).double()
    sigma2 = 1.0 / abar - 1.0
    point = x0.double() + bcast(sigma2.sqrt(), eps) * eps.double()  # [N, ...] = x_t / sqrt(abar)
    dist2 = torch.cdist(point.reshape(len(x0), -1), x0.double().reshape(len(x0), -1)) ** 2  # [N, N]
    return -dist2 / (2.0 * sigma2[:, None])


def transferred_target(x_t: Tensor, x0_source: Tensor, abar: Tensor) -> Tensor:
    """T2H's target ``eps' = (x_t - sqrt(abar) x0_j) / sqrt(1 - abar)``: the noise that would have
    produced ``x_t`` from the source row's clean input ``x0_j`` (``x0_j = x0_i`` gives back ``eps_i``).

    :param x_t: the [N x ...] noised inputs.
    :param x0_source: the [N x ...] clean inputs of the chosen source rows.
    :param abar: [N] cumulative alpha of each row's timestep.
    :return: float32 [N x ...] target.
    """
    _check_pair("x_t", x_t, "x0_source", x0_source)
    abar = bcast(_per_sample("abar", abar, x_t), x_t)
    return (x_t.float() - abar.sqrt() * x0_source.float()) / (1.0 - abar).sqrt()


def eps_loss_weights(t: torch.Tensor, scheduler, *, snr_gamma: float = 0.0) -> torch.Tensor | None:
    """Per-sample weights ``w(t)`` [N] for the eps-space losses of this module.

    The losses compare eps-predictions (the UNet output converted by
    :func:`pogdiff.model.models.output_to_eps`). ``w`` turns that squared error into the squared error of
    the model's own prediction type, ``snr = abar / (1 - abar)``:

    - ``epsilon``: ``w = 1``;
    - ``v_prediction``: ``eps_err = sqrt(abar) v_err``, so ``w = 1 / abar = (snr + 1) / snr``;
    - ``sample``: ``eps_err = -sqrt(abar / (1 - abar)) x0_err``, so ``w = 1 / snr``.

    With ``snr_gamma > 0`` the Min-SNR weight of that prediction type multiplies it (as in
    diffusers' training scripts: ``min(snr, gamma) / snr`` for epsilon, ``/ (snr + 1)`` for v,
    ``min(snr, gamma)`` for sample), which in eps space is ``min(snr, gamma) / snr`` for all three.
    Returns None when every weight is 1 (epsilon without Min-SNR).
    """
    from diffusers.training_utils import compute_snr

    kind = scheduler.config.prediction_type
    if kind == "epsilon" and not snr_gamma:
        return None
    snr = compute_snr(scheduler, t.long())
    native = {"epsilon": torch.ones_like(snr), "v_prediction": (snr + 1) / snr, "sample": 1 / snr}
    if kind not in native:
        raise ValueError(f"unsupported prediction_type {kind!r}; supported: {', '.join(native)}")
    weight = native[kind]
    if snr_gamma:
        clipped = torch.clamp(snr, max=snr_gamma)
        min_snr = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
        weight = weight * min_snr[kind]
    return weight.float()
