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

The math is :func:`mixture_norm` (functional, ``torch.nn.functional`` style); the module holds
the running estimates and calls it. The EM fit is tensor operations on the subsample (a short
loop over iterations only); the posteriors, moments and output over the whole batch run, on
CPU, as two fused passes forward and two backward (:mod:`fedctx.norm._mixkernel`, shared with
UAN), the posteriors recomputed in registers instead of stored as an ``(N, K, C, S)`` tensor.
"""

from __future__ import annotations

import math

import torch

from fedctx.norm._common import (
    BatchStatsNorm,
    check_input,
    describe,
    in_layout_of,
    momentum_update,
    stats_dtype,
)
from fedctx.norm._mixkernel import mixture_moments, mixture_moments_norm

_VAR_FLOOR = 1e-6
_PRIOR_FLOOR = 1e-12


@torch.no_grad()
def fit_gmm(
    x: torch.Tensor, num_components: int, iters: int = 3, max_samples: int | None = 16384
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit one 1-D GMM per channel of ``x`` ``(N, C, S)`` by EM; all channels at once.

    Returns ``(prior, mean, var)``, each ``(K, C)`` (variance floored at 1e-6).
    """
    n, c, s = x.shape
    total = n * s
    if max_samples is not None and total > max_samples:  # every stride-th of the N * S values
        idx = torch.arange(0, total, math.ceil(total / max_samples), device=x.device)
        data = x[idx // s, :, idx % s].T  # (C, M), gathered without copying x
    else:
        data = x.transpose(0, 1).reshape(c, total)
    data = data.to(stats_dtype(x.dtype)).contiguous()
    var0, mean0 = torch.var_mean(data, dim=1, correction=0)  # (C,)
    k = torch.arange(num_components, device=x.device, dtype=data.dtype)
    z = math.sqrt(2.0) * torch.erfinv(2 * (k + 0.5) / num_components - 1)  # (K,)
    mean = mean0 + z.unsqueeze(1) * var0.sqrt()  # (K, C)
    var = (var0 / num_components).clamp_min(_VAR_FLOOR).expand(num_components, c).clone()
    prior = torch.full_like(mean, 1.0 / num_components)
    for _ in range(iters):  # E step and M step: one pass over the samples
        q, r = _gmm_logits(prior, mean, var)
        mass, mean, var = mixture_moments(data.unsqueeze(0), q, mean, r)
        var = var.clamp_min(_VAR_FLOOR)
        prior = mass.clamp_min(_PRIOR_FLOOR) / data.shape[1]
    return prior, mean, var


def _gmm_logits(
    prior: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, r)`` with ``log(prior N(x; mean, var)) = q - ((x - mean) r)^2 / 2``, all ``(K, C)``
    (variance floored at 1e-6, prior at 1e-12)."""
    var = var.clamp_min(_VAR_FLOOR)
    q = torch.log(prior.clamp_min(_PRIOR_FLOOR)) - 0.5 * torch.log(2 * math.pi * var)
    return q, torch.rsqrt(var)


def mixture_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    running_prior: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    num_components: int = 2,
    em_iters: int = 3,
    em_max_samples: int | None = 16384,
) -> torch.Tensor:
    """Mixture Normalization (Kalayeh & Shah, TPAMI 2019), functional form.

    ``y = weight * sum_k tau_k / sqrt(lambda_k) * (x - E_k) / sqrt(V_k + eps) + bias``. In
    training (or without running estimates) a ``num_components`` GMM per channel is fitted by EM
    (:func:`fit_gmm`), ``tau`` are its posteriors (constants for the gradient), ``lambda_k`` the
    mean posterior and ``E_k, V_k`` the posterior-weighted moments over the batch and spatial
    positions; the running estimates (when given) move towards them in place with ``momentum``
    (``F.batch_norm``'s convention). Otherwise ``tau`` comes from the running GMM
    ``(running_prior, running_mean, running_var)`` and the running ``E, V`` normalize.

    Args:
        input: ``(N, C, *spatial)``.
        running_mean, running_var, running_prior: ``(K, C)`` or ``None``.
        weight, bias: ``(C,)`` or ``None``.

    Returns:
        ``(N, C, *spatial)``, ``input``'s dtype (statistics in float32 or wider).
    """
    n, c = input.shape[:2]
    sd = stats_dtype(input.dtype)
    x = input.to(sd).reshape(n, c, -1)
    weight, bias = (None if t is None else t.to(sd) for t in (weight, bias))
    if training or running_mean is None:
        prior, mean, var = fit_gmm(x, num_components, em_iters, em_max_samples)
        q, r = _gmm_logits(prior, mean, var)
        out, e, v, mass = mixture_moments_norm(x, q, mean, r, None, None, None, weight, bias,
                                               eps, tau_grad=False)
        if training and running_mean is not None:
            momentum_update(running_mean, e, momentum)
            momentum_update(running_var, v, momentum)
            if running_prior is not None:
                momentum_update(running_prior, mass / (n * x.shape[-1]), momentum)
    else:
        e, v = running_mean.to(sd), running_var.to(sd)
        lam = running_prior.to(sd)
        q, r = _gmm_logits(lam, e, v)
        coef = torch.rsqrt(lam.clamp_min(_PRIOR_FLOOR))
        out = mixture_moments_norm(x, q, e, r, coef, e, v, weight, bias, eps)[0]
    return in_layout_of(out.to(input.dtype).reshape(input.shape), input)


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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        shape = (num_components, num_features)
        prior = torch.full(shape, 1.0 / num_components, device=device, dtype=dtype)
        super().__init__(
            num_features, eps, momentum, affine, stats_shape=shape,
            extra_stats={"running_prior": prior}, device=device, dtype=dtype,
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
        if self.training:
            self.num_batches_tracked.add_(1)
        return mixture_norm(
            x, self.running_mean, self.running_var, self.running_prior, self.weight, self.bias,
            self.training, self.momentum, self.eps, self.num_components, self.em_iters,
            self.em_max_samples,
        )

    def extra_repr(self) -> str:
        return describe(self, "num_components", "eps", "momentum", "affine", "em_iters")
