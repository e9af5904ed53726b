"""Mixture Normalization (MN).

Kalayeh & Shah, "Training Faster by Separating Modes of Variation in Batch-normalized Models",
TPAMI 2019 (arXiv:1806.02892). Each channel's activations in a mini-batch are modelled by a
Gaussian mixture with ``K`` components fitted by EM; every activation is normalized by each
component, weighted by its posterior::

    tau_k(x)  = lambda_k N(x; mu_k, s_k) / sum_j lambda_j N(x; mu_j, s_j)      (fitted GMM)
    tauh_k(x_i) = tau_k(x_i) / sum_m tau_k(x_m)                                (over the batch)
    E_k = sum_i tauh_k(x_i) x_i,   V_k = sum_i tauh_k(x_i) (x_i - E_k)^2
    y   = gamma * sum_k tau_k(x) / sqrt(lambda_k) * (x - E_k) / sqrt(V_k + eps) + beta

Choices where the paper leaves a detail open (each tested):

* One 1-D GMM per channel, over the ``N * prod(spatial)`` values of that channel.
* EM: ``em_iters`` iterations (default 3), initialised deterministically at
  ``mu_k = m + s * Phi^-1((k + 0.5) / K)``, ``s_k = s^2 / K``, ``lambda_k = 1 / K`` (``m, s`` the
  channel's batch mean and std), so components stay ordered by mean and running averages of
  component ``k`` refer to the same mode across batches. EM runs without gradient on at most
  ``em_max_samples`` evenly strided values per channel; the variance is floored at 1e-6.
* Gradients flow through ``E_k``, ``V_k`` (as in batch norm); the posteriors ``tau`` are treated
  as constants. ``lambda_k`` is the mean posterior over the batch.
* Running estimates ``running_mean`` (E), ``running_var`` (V), ``running_prior`` (lambda), each
  ``(K, C)``, follow ``nn.BatchNorm``'s momentum convention; evaluation computes ``tau`` from the
  running GMM and normalizes with the running ``E, V``.

No Python loop over components: the component axis is a tensor dimension ``(N, K, C, S)``
(EM iterations are a short loop over iterations only).
"""

from __future__ import annotations

import math

import torch

from fedctx.norm._common import (
    BatchStatsNorm,
    apply_affine,
    check_input,
    describe,
    momentum_update,
    stats_dtype,
)


def _log_gauss(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, prior: torch.Tensor):
    """``log(prior N(x; mean, var))`` broadcast over ``x`` ``(..., 1, C, S)`` and ``(K, C, 1)``."""
    return torch.log(prior) - 0.5 * torch.log(2 * math.pi * var) - (x - mean).square() / (2 * var)


@torch.no_grad()
def fit_gmm(
    x: torch.Tensor, num_components: int, iters: int = 3, max_samples: int | None = 16384
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit one 1-D GMM per channel of ``x`` ``(N, C, S)`` by EM; all channels at once.

    Returns ``(prior, mean, var)``, each ``(K, C)``.
    """
    n, c, s = x.shape
    data = x.transpose(0, 1).reshape(c, n * s).to(stats_dtype(x.dtype))  # (C, M)
    if max_samples is not None and data.shape[1] > max_samples:
        stride = math.ceil(data.shape[1] / max_samples)
        data = data[:, ::stride]
    var0, mean0 = torch.var_mean(data, dim=1, correction=0)  # (C,)
    k = torch.arange(num_components, device=x.device, dtype=data.dtype)
    z = math.sqrt(2.0) * torch.erfinv(2 * (k + 0.5) / num_components - 1)  # (K,)
    mean = mean0 + z.unsqueeze(1) * var0.sqrt()  # (K, C)
    var = (var0 / num_components).clamp_min(1e-6).expand(num_components, c).clone()
    prior = torch.full_like(mean, 1.0 / num_components)
    xk = data.unsqueeze(0)  # (1, C, M)
    for _ in range(iters):
        resp = torch.softmax(
            _log_gauss(xk, mean.unsqueeze(-1), var.unsqueeze(-1), prior.unsqueeze(-1)), dim=0
        )  # (K, C, M)
        nk = resp.sum(-1).clamp_min(1e-12)  # (K, C)
        mean = (resp * xk).sum(-1) / nk
        var = ((resp * (xk - mean.unsqueeze(-1)).square()).sum(-1) / nk).clamp_min(1e-6)
        prior = nk / data.shape[1]
    return prior, mean, var


def _posteriors(xs: torch.Tensor, prior: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    """``tau`` ``(N, K, C, S)`` for ``xs`` ``(N, 1, C, S)`` and GMM parameters ``(K, C)``."""
    logp = _log_gauss(
        xs, mean.unsqueeze(-1), var.clamp_min(1e-6).unsqueeze(-1),
        prior.clamp_min(1e-12).unsqueeze(-1),
    )
    return torch.softmax(logp, dim=1)


class MixtureNorm(BatchStatsNorm):
    """Mixture Normalization over ``(N, C, *spatial)`` inputs (see module docstring).

    Args:
        num_features: channels ``C``.
        num_components: mixture components ``K`` (paper: 2 to 5).
        eps, momentum: as in ``nn.BatchNorm``.
        affine: per-channel ``gamma, beta``.
        em_iters: EM iterations per training batch.
        em_max_samples: values per channel the EM fit uses (strided subsample; ``None``: all).
    """

    def __init__(
        self,
        num_features: int,
        num_components: int = 2,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        em_iters: int = 3,
        em_max_samples: int | None = 16384,
    ) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        shape = (num_components, num_features)
        super().__init__(
            num_features, eps, momentum, affine, stats_shape=shape,
            extra_stats={"running_prior": torch.full(shape, 1.0 / num_components)},
        )
        self.num_components = num_components
        self.em_iters = em_iters
        self.em_max_samples = em_max_samples
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        k = self.num_components
        z = math.sqrt(2.0) * torch.erfinv(2 * (torch.arange(k) + 0.5) / k - 1)
        self.running_mean.copy_(z.unsqueeze(1).expand_as(self.running_mean))
        self.running_var.fill_(1.0 / k)
        self.running_prior.fill_(1.0 / k)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        n, c = x.shape[:2]
        sd = stats_dtype(x.dtype)
        xf = x.reshape(n, c, -1)
        xs = xf.to(sd).unsqueeze(1)  # (N, 1, C, S)
        if self.training:
            prior, mu, var = fit_gmm(xf, self.num_components, self.em_iters, self.em_max_samples)
            with torch.no_grad():
                tau = _posteriors(xs, prior, mu, var)  # (N, K, C, S), constant
                mass = tau.sum((0, 3))  # (K, C)
                lam = mass / (n * xf.shape[-1])
            w = tau / mass.clamp_min(1e-12).unsqueeze(-1)  # tauh
            e = (w * xs).sum((0, 3))  # (K, C)
            v = (w * (xs - e.unsqueeze(-1)).square()).sum((0, 3))
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum_update(self.running_mean, e, self.momentum)
                momentum_update(self.running_var, v, self.momentum)
                momentum_update(self.running_prior, lam, self.momentum)
        else:
            e, v, lam = self.running_mean, self.running_var, self.running_prior
            tau = _posteriors(xs, lam, e, v)
        coef = tau * torch.rsqrt(lam.clamp_min(1e-12)).unsqueeze(-1)
        out = (coef * (xs - e.unsqueeze(-1)) * torch.rsqrt(v + self.eps).unsqueeze(-1)).sum(1)
        return apply_affine(out, self.weight, self.bias).to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return describe(self, "num_components", "eps", "momentum", "affine", "em_iters")
