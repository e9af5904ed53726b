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

No Python loop over components: the component axis is a tensor dimension ``(N, K, C, S)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fedctx.norm._common import (
    apply_affine,
    check_input,
    describe,
    init_affine,
    init_running_stats,
    momentum_update,
    reset_affine,
    reset_running_stats,
    stats_dtype,
)

_CHUNK_ELEMENTS = 1 << 22  # (n, K, C, S) temporaries per chunk: 16 MB in float32
_ASSIGNMENTS = ("authors", "softmax")


def responsibilities(logits: torch.Tensor, dim: int, log_eps: float | None) -> torch.Tensor:
    """``tau`` from ``logits = log g`` along ``dim``.

    ``log_eps=None``: ``softmax`` (``g_k / sum_j g_j``). Otherwise the authors'
    ``g_k / (sum_j g_j + eps)`` with ``eps = exp(log_eps)``, as
    ``exp(l_k - logaddexp(logsumexp(l), log_eps))`` (no overflow, finite gradients). Both have
    the Jacobian ``d tau_k / d l_j = tau_k (delta_kj - tau_j)``.
    """
    if log_eps is None:
        return torch.softmax(logits, dim=dim)
    lse = torch.logsumexp(logits, dim=dim, keepdim=True)
    return torch.exp(logits - torch.logaddexp(lse, torch.full_like(lse, log_eps)))


def _log_eps(assignment: str, eps: float) -> float | None:
    return math.log(eps) if assignment == "authors" else None


class _UANFunction(torch.autograd.Function):
    """Eager UAN kernel (before the affine): ``y = sum_k tau_k c_k z_k``, ``z_k = (x - mu_k) r_k``.

    ``tau`` by :func:`responsibilities` (``log_eps``: ``None`` for the softmax); the backward
    below holds for both forms (same Jacobian of ``tau`` in the logits).

    Processes the batch in sample chunks to bound the ``(n, K, C, S)`` temporaries (the
    loop is over samples, never over components), saves only ``x`` and recomputes ``tau`` in a
    closed-form backward::

        G_z_k = g tau_k (c_k - (c_k z_k - y) z_k),   G_l_k = g tau_k (c_k z_k - y)
        dx = sum_k r_k G_z_k,   dmu_k = -r_k sum G_z_k,   dv_k = -r_k^2 / 2 sum G_z_k z_k
        dpi_k = sum G_l_k / pi_k - c_k^3 / 2 sum g tau_k z_k

    with ``r_k = (v_k + eps)^-1/2``, ``c_k = (pi_k + eps)^-1/2``.
    """

    @staticmethod
    def _chunk(xc, r, b, log_prior, coef, log_eps):
        z = torch.addcmul(b, xc.unsqueeze(1), r)  # (n, K, C, S)
        tau = responsibilities(torch.addcmul(log_prior, z, z, value=-0.5), 1, log_eps)
        u = z * coef
        return z, tau, u, (tau * u).sum(1)

    @staticmethod
    def _consts(mean, var, prior, eps):
        r = torch.rsqrt(var + eps).unsqueeze(-1)  # (K, C, 1)
        b = -mean.unsqueeze(-1) * r
        log_prior = torch.log(prior).view(-1, 1, 1)
        coef = torch.rsqrt(prior + eps).view(-1, 1, 1)
        return r, b, log_prior, coef

    @staticmethod
    def _step(x: torch.Tensor, k: int) -> int:
        return max(1, _CHUNK_ELEMENTS // max(1, k * x[0].numel()))

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        prior: torch.Tensor,
        eps: float,
        log_eps: float | None = None,
    ) -> torch.Tensor:
        consts = _UANFunction._consts(mean, var, prior, eps)
        out = torch.empty_like(x)
        step = _UANFunction._step(x, mean.shape[0])
        for i in range(0, x.shape[0], step):
            out[i:i + step] = _UANFunction._chunk(x[i:i + step], *consts, log_eps)[3]
        ctx.save_for_backward(x, mean, var, prior)
        ctx.eps = eps
        ctx.log_eps = log_eps
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, mean, var, prior = ctx.saved_tensors
        r, b, log_prior, coef = _UANFunction._consts(mean, var, prior, ctx.eps)
        grad_x = torch.empty_like(x)
        s_gz = torch.zeros_like(mean)
        s_gzz = torch.zeros_like(mean)
        s_gl = torch.zeros_like(prior)
        s_gtz = torch.zeros_like(prior)
        step = _UANFunction._step(x, mean.shape[0])
        for i in range(0, x.shape[0], step):
            z, tau, u, y = _UANFunction._chunk(x[i:i + step], r, b, log_prior, coef,
                                               ctx.log_eps)
            gt = grad[i:i + step].unsqueeze(1) * tau  # (n, K, C, S)
            gl = gt * (u - y.unsqueeze(1))
            gz = gt * coef - gl * z
            grad_x[i:i + step] = (gz * r).sum(1)
            s_gz += gz.sum((0, 3))
            s_gzz += (gz * z).sum((0, 3))
            s_gl += gl.sum((0, 2, 3))
            s_gtz += (gt * z).sum((0, 2, 3))
        r2 = r.squeeze(-1)
        grad_mean = -r2 * s_gz
        grad_var = -0.5 * r2.square() * s_gzz
        grad_prior = s_gl / prior - 0.5 * coef.flatten() ** 3 * s_gtz
        return grad_x, grad_mean, grad_var, grad_prior, None, None


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
    """Functional UAN with learned moments.

    Args:
        x: ``(N, C, *spatial)``.
        mean, var: ``(K, C)`` component means and (positive) variances.
        prior: ``(K,)`` mixing weights (sum to one).
        weight, bias: ``(C,)`` or ``None``.
        assignment: ``"authors"`` (``eps`` in the denominator of ``tau``) or ``"softmax"``.
    """
    n, c = x.shape[:2]
    sd = stats_dtype(x.dtype)
    log_eps = _log_eps(assignment, eps)
    if not torch.compiler.is_compiling():  # eager: chunked kernel with closed-form backward
        out = _UANFunction.apply(
            x.to(sd).reshape(n, c, -1), mean.to(sd), var.to(sd), prior.to(sd), eps, log_eps
        )
        return apply_affine(out, weight, bias).to(x.dtype).reshape(x.shape)
    xs = x.to(sd).reshape(n, 1, c, -1)  # (N, 1, C, S); compiled: one fused graph
    inv_std = torch.rsqrt(var.to(sd) + eps)  # (K, C)
    z = torch.addcmul((-mean.to(sd) * inv_std).unsqueeze(-1), xs, inv_std.unsqueeze(-1))
    log_prior = torch.log(prior.to(sd)).reshape(1, -1, 1, 1)
    tau = responsibilities(torch.addcmul(log_prior, z, z, value=-0.5), 1, log_eps)  # (N,K,C,S)
    coef = torch.rsqrt(prior.to(sd) + eps).reshape(1, -1, 1, 1)
    out = (tau * z * coef).sum(1)  # (N, C, S)
    return apply_affine(out, weight, bias).to(x.dtype).reshape(x.shape)


_MOMENTS = ("batch", "learned")


def _assign(
    xs: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, prior: torch.Tensor, eps: float,
    assignment: str = "authors",
) -> torch.Tensor:
    """``tau`` ``(N, K, C, S)`` for ``xs`` ``(N, 1, C, S)`` and learned ``(K, C)`` / ``(K,)``."""
    z = (xs - mean.unsqueeze(-1)) * torch.rsqrt(var + eps).unsqueeze(-1)
    logits = torch.log(prior).view(-1, 1, 1) - 0.5 * z.square()
    return responsibilities(logits, 1, _log_eps(assignment, eps))


def _mix(
    xs: torch.Tensor, tau: torch.Tensor, e: torch.Tensor, v: torch.Tensor, prior: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``sum_k tau_k / sqrt(pi_k + eps) * (x - E_k) / sqrt(V_k + eps)``, ``(N, C, S)``."""
    scale = torch.rsqrt(v + eps) * torch.rsqrt(prior + eps).unsqueeze(-1)  # (K, C)
    return (tau * (xs - e.unsqueeze(-1)) * scale.unsqueeze(-1)).sum(1)


def batch_moments_uan(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    prior: torch.Tensor,
    eps: float = 1e-3,
    assignment: str = "authors",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UAN's training branch with batch moments (before the affine), see the module docstring.

    Args:
        x: ``(N, C, S)`` (statistics dtype).
        mean, var: ``(K, C)`` learned component means and (positive) variances.
        prior: ``(K,)`` learned mixing weights.

    Returns:
        ``(y, E, V)``: ``(N, C, S)``, and the batch moments ``(K, C)`` per component and channel.
    """
    xs = x.unsqueeze(1)  # (N, 1, C, S)
    tau = _assign(xs, mean, var, prior, eps, assignment)  # (N, K, C, S)
    mass = tau.sum((0, 3)).clamp_min(torch.finfo(x.dtype).tiny)  # (K, C)
    w = tau / mass.unsqueeze(-1)  # tauh: sums to one over (N, S)
    e = (w * xs).sum((0, 3))  # broadcast, not einsum: einsum's bmm would run in autocast bf16
    d = xs - e.unsqueeze(-1)
    v = (w * d.square()).sum((0, 3))
    scale = torch.rsqrt(v + eps) * torch.rsqrt(prior + eps).unsqueeze(-1)
    return (tau * d * scale.unsqueeze(-1)).sum(1), e, v


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

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        eps: float = 1e-3,
        affine: bool = True,
        moments: str = "batch",
        momentum: float = 0.1,
        assignment: str = "authors",
    ) -> None:
        super().__init__()
        self._build(num_features, num_components, eps, affine, moments, momentum, assignment)

    def _build(
        self, num_features: int, num_components: int, eps: float, affine: bool,
        moments: str = "learned", momentum: float = 0.1, assignment: str = "authors",
    ) -> None:
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
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.affine = affine
        self.moments = moments
        self.momentum = momentum
        self.assignment = assignment
        self.mean = nn.Parameter(torch.empty(num_components, num_features))
        self.var_raw = nn.Parameter(torch.empty(num_components, num_features))
        self.prior_raw = nn.Parameter(torch.empty(num_components))
        init_affine(self, affine, (num_features,))
        init_running_stats(self, (num_components, num_features) if moments == "batch" else None)
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

    def _soft(self, x: torch.Tensor) -> torch.Tensor:
        return unsupervised_adaptive_norm(
            x, self.mean, self.var, self.prior, self.weight, self.bias, self.eps, self.assignment
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        if self.moments == "learned":
            return self._soft(x)
        n, c = x.shape[:2]
        sd = stats_dtype(x.dtype)
        xf = x.to(sd).reshape(n, c, -1)
        mean, var, prior = self.mean.to(sd), self.var.to(sd), self.prior.to(sd)
        if self.training:
            out, e, v = batch_moments_uan(xf, mean, var, prior, self.eps, self.assignment)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum_update(self.running_mean, e.detach(), self.momentum)
                momentum_update(self.running_var, v.detach(), self.momentum)
        else:
            xs = xf.unsqueeze(1)
            tau = _assign(xs, mean, var, prior, self.eps, self.assignment)
            out = _mix(xs, tau, self.running_mean.to(sd), self.running_var.to(sd), prior, self.eps)
        return apply_affine(out, self.weight, self.bias).to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        fields = ("num_components", "eps", "affine", "moments", "assignment")
        return describe(self, *fields, *(("momentum",) if self.moments == "batch" else ()))
