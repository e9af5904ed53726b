"""Unsupervised Adaptive Normalization (UAN / UCB-Norm) and its supervised variant (SCB).

Faye et al., "Unsupervised Adaptive Normalization", IJCNN 2024 (arXiv:2409.04757; also
"ACN" in arXiv:2403.16798 v3). Each channel's activations are modelled by a mixture of ``K``
Gaussians whose means ``mu_k``, variances ``v_k`` and mixing weights ``pi_k`` are **learned by
backpropagation**. Every scalar activation ``x`` is softly assigned to the components
(``assignment="authors"``, the default, the authors' formula)::

    g_k(x)   = pi_k exp(-(x - mu_k)^2 / (2 (v_k + eps)))
    tau_k(x) = g_k(x) / (sum_j g_j(x) + eps)

and normalized by each component, with one of two sets of moments (``moments=``):

* ``"batch"`` (default; the authors' Mixture-Normalization-style training branch, in the clean
  form of PAPERS.md): in training, with sums over the batch and spatial positions ``(N, S)``
  per channel and component::

      tauh_k(x_i) = tau_k(x_i) / sum_m tau_k(x_m)
      E_k = sum_i tauh_k(x_i) x_i,    V_k = sum_i tauh_k(x_i) (x_i - E_k)^2
      y   = gamma * sum_k tau_k(x) / sqrt(pi_k + eps) * (x - E_k) / sqrt(V_k + eps) + beta

  Gradients flow through ``E_k``, ``V_k`` (as in batch norm) and through ``tau`` into ``pi``,
  ``mu``, ``v``. ``running_mean`` (E) and ``running_var`` (V, biased), both ``(K, C)``, follow
  ``nn.BatchNorm``'s momentum convention (``momentum=0.1``); evaluation uses them in place of
  ``E_k, V_k`` (``tau`` still from the learned ``pi, mu, v``, so it is per sample). The
  authors' code averages ``E, V`` per sample over spatial positions only and runs the layer in
  training mode at test time; neither is done here. No running ``pi``: ``pi`` is learned.
* ``"learned"`` (the paper's backprop variant; no batch statistics, train = eval, independent
  of the batch size): ``E_k = mu_k``, ``V_k = v_k`` above, i.e.
  ``y = gamma * sum_k tau_k(x) / sqrt(pi_k + eps) * (x - mu_k) / sqrt(v_k + eps) + beta``.
  Measured: a digits CNN does not learn with it (chance accuracy after 4 federated rounds),
  hence the default ``"batch"``.

Implemented choices (each tested):

* Parameters and initialisation follow the authors' code: ``mu`` ``(K, C)`` ~ U(-1, 1);
  ``v = softplus(v_raw)`` with ``v_raw`` ``(K, C)`` ~ U(1e-3, 1e-2); ``pi = softmax(pi_raw)``
  over ``K`` with ``pi_raw`` ``(K,)`` ~ U(0.01, 0.99) **divided by its sum** (the authors'
  ``reset_parameters`` normalises the raw prior before the softmax, so the initial ``pi`` is
  closer to uniform than ``softmax(U(0.01, 0.99))``); ``eps = 1e-3``; ``K = 3``.
* ``tau`` (``assignment=``): ``"authors"`` (default) is the authors' ``g_k / (sum_j g_j + eps)``,
  computed stably as ``exp(l_k - logaddexp(logsumexp_j l_j, log eps))`` with
  ``l_k = log g_k``; its ``tau`` sums to less than one where every ``g_j`` is small, and to
  zero for an activation far from every ``mu_k`` (the output there is 0 + beta).
  ``"softmax"`` drops the ``eps`` (``tau`` always sums to one; the form fedctx used before).
  The two differ by more than 1 % (relative, in ``sum_k tau_k``) on about 6 % of
  unit-variance activations at the authors' initialisation, where ``sum_j g_j`` is not >> eps.
  As in the authors' code, the Gaussian normaliser ``1 / sqrt(2 pi v_k)`` is left out of
  ``tau``.
  Measured on the default federated scenario (seed 0, 8 rounds): 0.60 test accuracy with the
  authors' form, 0.82 with ``"softmax"`` (zeroing the activations far from every component
  costs a lot while the network is young); the default stays the authors' formula so that
  ``uan`` is their layer, and ``"softmax"`` is the option to use for accuracy.
* ``affine=True`` (default) adds a per-channel ``gamma, beta`` (C,) as every fedctx norm has;
  ``affine=False`` is the paper's layer.

The authors' **SCB-Norm** (supervised cluster-based) is not a supervised form of this mixture:
in their code it is ACN's computation, so ``scb`` is :class:`~fedctx.norm.AdaptiveContextNorm`.
(fedctx had a "supervised UAN", the learned mixture with the component given by the context,
under the name ``scb``; it was no paper's layer, started far from the identity, about 2.4x per
layer with 4 contexts, and diverged on the default scenario, so it was removed.)

The math is :func:`uan_norm` (functional, ``torch.nn.functional`` style); the module holds the
parameters and running moments and calls it. On CPU it runs as fused passes over ``x`` with a
closed-form backward (:mod:`fedctx.norm._mixkernel`, shared with Mixture Normalization): two
passes forward and two backward in training, one each way in evaluation, with the ``K``
responsibilities recomputed in registers instead of stored as an ``(N, K, C, S)`` tensor.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedctx.norm._common import (
    check_input,
    describe,
    in_layout_of,
    init_affine,
    init_running_stats,
    momentum_update,
    reset_affine,
    reset_running_stats,
    stats_dtype,
)
from fedctx.norm._mixkernel import mixture_moments_norm, responsibilities

_ASSIGNMENTS = ("authors", "softmax")
_MOMENTS = ("batch", "learned")


def _log_eps(assignment: str, eps: float) -> float | None:
    return math.log(eps) if assignment == "authors" else None


def _assign(
    xs: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, prior: torch.Tensor, eps: float,
    assignment: str = "authors",
) -> torch.Tensor:
    """``tau`` ``(N, K, C, S)`` for ``xs`` ``(N, 1, C, S)`` and learned ``(K, C)`` / ``(K,)``, as
    tensor operations (to inspect the assignment; the layer itself never stores ``tau``)."""
    z = (xs - mean.unsqueeze(-1)) * torch.rsqrt(var + eps).unsqueeze(-1)
    logits = torch.log(prior).view(-1, 1, 1) - 0.5 * z.square()
    return responsibilities(logits, 1, _log_eps(assignment, eps))


def uan_norm(
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    prior: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-3,
    assignment: str = "authors",
    moments: str = "batch",
) -> torch.Tensor:
    """Unsupervised Adaptive Normalization (Faye et al., IJCNN 2024), functional form.

    ``y = weight * sum_k tau_k / sqrt(pi_k + eps) * (x - E_k) / sqrt(V_k + eps) + bias`` with
    ``tau_k = g_k / (sum_j g_j + eps)``, ``g_k = pi_k exp(-(x - mu_k)^2 / (2 (v_k + eps)))``
    (``assignment="softmax"``: no ``eps`` in ``tau``'s denominator). ``moments="batch"``: in
    training (or without running moments) ``E_k, V_k`` are the ``tau``-weighted moments over
    the batch and spatial positions, and ``running_mean``/``running_var`` (when given) move
    towards them in place with ``momentum`` (``F.batch_norm``'s convention); otherwise the
    running moments are used. ``moments="learned"``: ``E_k = mu_k``, ``V_k = v_k`` always.

    Args:
        input: ``(N, C, *spatial)``.
        mean, var: ``(K, C)`` learned component means ``mu`` and (positive) variances ``v``.
        prior: ``(K,)`` learned mixing weights ``pi`` (sum to one).
        running_mean, running_var: ``(K, C)`` or ``None``.
        weight, bias: ``(C,)`` or ``None``.

    Returns:
        ``(N, C, *spatial)``, ``input``'s dtype (statistics in float32 or wider).
    """
    n, c = input.shape[:2]
    sd = stats_dtype(input.dtype)
    x = input.to(sd).reshape(n, c, -1)
    mean, var, prior = mean.to(sd), var.to(sd), prior.to(sd)
    k = mean.shape[0]
    batch = moments == "batch" and (training or running_mean is None)
    if moments == "learned":
        e, v = mean, var
    elif batch:
        e = v = None
    else:
        e, v = running_mean.to(sd), running_var.to(sd)
    out, e_batch, v_batch, _ = mixture_moments_norm(
        x, torch.log(prior).unsqueeze(1).expand(k, c), mean, torch.rsqrt(var + eps),
        torch.rsqrt(prior + eps).unsqueeze(1).expand(k, c), e, v,
        *(None if t is None else t.to(sd) for t in (weight, bias)), eps,
        _log_eps(assignment, eps),
    )
    if batch and training and running_mean is not None:
        momentum_update(running_mean, e_batch, momentum)
        momentum_update(running_var, v_batch, momentum)
    return in_layout_of(out.to(input.dtype).reshape(input.shape), input)


def unsupervised_adaptive_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    prior: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-3,
    assignment: str = "authors",
) -> torch.Tensor:
    """UAN with learned moments: ``uan_norm(..., moments="learned")``."""
    return uan_norm(x, mean, var, prior, weight=weight, bias=bias, eps=eps,
                    assignment=assignment, moments="learned")


class UnsupervisedAdaptiveNorm(nn.Module):
    """UAN / UCB-Norm over ``(N, C, *spatial)`` inputs (see module docstring).

    Training (``moments="batch"``, default)::

        tau_k = g_k / (sum_j g_j + eps),   g_k = pi_k exp(-(x - mu_k)^2 / (2 (v_k + eps)))
        tauh_k = tau_k / sum_(N,S) tau_k
        E_k = sum_(N,S) tauh_k x,   V_k = sum_(N,S) tauh_k (x - E_k)^2
        y = gamma * sum_k tau_k / sqrt(pi_k + eps) * (x - E_k) / sqrt(V_k + eps) + beta

    (Faye et al., UAN, IJCNN 2024, the Mixture-Normalization-style training branch, moments
    per channel and component over ``(N, S)``); evaluation uses ``running_mean``/``running_var``
    ``(K, C)`` for ``E, V``. ``moments="learned"``: ``E_k = mu_k``, ``V_k = v_k`` (the paper's
    backprop variant, no batch statistics, no running buffers).

    Args:
        num_features: channels ``C``.
        num_components: Gaussian components ``K`` (default 3).
        eps: ``1e-3`` as in the paper.
        affine: per-channel ``gamma, beta`` after the mixture normalization.
        moments: ``"batch"`` (batch moments in training, running ones in evaluation) or
            ``"learned"`` (the learned ``mu, v`` everywhere).
        momentum: running-statistics momentum, ``nn.BatchNorm``'s convention
            (``running <- (1 - momentum) running + momentum batch``); ``moments="batch"`` only.
        assignment: ``"authors"`` (``tau`` with ``eps`` in its denominator, the authors'
            code) or ``"softmax"`` (``tau`` sums to one everywhere).
    """

    expected_dims: tuple[int, ...] = (2, 3, 4, 5)
    is_normalization: ClassVar[bool] = True

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        eps: float = 1e-3,
        affine: bool = True,
        moments: str = "batch",
        momentum: float = 0.1,
        assignment: str = "authors",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        if moments not in _MOMENTS:
            raise ValueError(f"moments must be one of {', '.join(_MOMENTS)}, got {moments!r}")
        if assignment not in _ASSIGNMENTS:
            raise ValueError(
                f"assignment must be one of {', '.join(_ASSIGNMENTS)}, got {assignment!r}"
            )
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.affine = affine
        self.moments = moments
        self.momentum = momentum
        self.assignment = assignment
        shape = (num_components, num_features)
        self.mean = nn.Parameter(torch.empty(shape, **factory_kwargs))
        self.var_raw = nn.Parameter(torch.empty(shape, **factory_kwargs))
        self.prior_raw = nn.Parameter(torch.empty(num_components, **factory_kwargs))
        init_affine(self, affine, (num_features,), **factory_kwargs)
        init_running_stats(self, shape if moments == "batch" else None, **factory_kwargs)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running ``E`` 0, running ``V`` 1, no batches tracked (``moments="batch"``)."""
        reset_running_stats(self)

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.mean, -1.0, 1.0)
        nn.init.uniform_(self.var_raw, 1e-3, 1e-2)
        with torch.no_grad():  # the authors' init: U(0.01, 0.99) divided by its sum
            self.prior_raw.uniform_(0.01, 0.99)
            self.prior_raw.div_(self.prior_raw.sum())
        reset_affine(self)
        self.reset_running_stats()

    @property
    def var(self) -> torch.Tensor:
        """Component variances ``softplus(v_raw)``, ``(K, C)``."""
        return F.softplus(self.var_raw)

    @property
    def prior(self) -> torch.Tensor:
        """Mixing weights ``softmax(pi_raw)``, ``(K,)``."""
        return torch.softmax(self.prior_raw, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        training = self.training and self.moments == "batch"
        if training:
            self.num_batches_tracked.add_(1)
        return uan_norm(
            x, self.mean, self.var, self.prior, self.running_mean, self.running_var, self.weight,
            self.bias, training, self.momentum, self.eps, self.assignment, self.moments,
        )

    def extra_repr(self) -> str:
        fields = ("num_components", "eps", "affine", "moments", "assignment")
        return describe(self, *fields, *(("momentum",) if self.moments == "batch" else ()))
