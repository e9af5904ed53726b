"""Unsupervised Adaptive Normalization (UAN / UCB-Norm) and its supervised variant (SCB).

Faye et al., "Unsupervised Adaptive Normalization", IJCNN 2024 (arXiv:2409.04757; also
"ACN" in arXiv:2403.16798 v3). Each channel's activations are modelled by a mixture of ``K``
Gaussians whose means ``mu_k``, variances ``v_k`` and mixing weights ``pi_k`` are **learned by
backpropagation** (no batch statistics, so the layer is independent of the batch size). Every
scalar activation ``x`` is softly assigned to the components and normalized by each::

    g_k(x)   = pi_k exp(-(x - mu_k)^2 / (2 (v_k + eps)))
    tau_k(x) = g_k(x) / sum_j g_j(x)
    y        = gamma * sum_k tau_k(x) / sqrt(pi_k + eps) * (x - mu_k) / sqrt(v_k + eps) + beta

Implemented variant and choices (each tested):

* This is the paper's backprop variant (the "clean version" of PAPERS.md), not the authors'
  Mixture-Normalization-style training branch: there are no batch moments, train and eval
  compute the same function.
* Parameters and initialisation follow the authors' code: ``mu`` ``(K, C)`` ~ U(-1, 1);
  ``v = softplus(v_raw)`` with ``v_raw`` ``(K, C)`` ~ U(1e-3, 1e-2); ``pi = softmax(pi_raw)``
  over ``K`` with ``pi_raw`` ``(K,)`` ~ U(0.01, 0.99); ``eps = 1e-3``; ``K = 3``.
* The authors add ``eps`` to the denominator of ``tau``; here ``tau`` is a softmax of
  ``log pi_k - (x - mu_k)^2 / (2 (v_k + eps))`` (same value when the sum is >> eps, and no
  underflow to an all-zero assignment for activations far from every ``mu_k``). As in the
  authors' code, the Gaussian normaliser ``1 / sqrt(2 pi v_k)`` is left out of ``tau``.
* ``affine=True`` (default) adds a per-channel ``gamma, beta`` (C,) as every fedctx norm has;
  ``affine=False`` is the paper's layer.

:class:`SupervisedClusterNorm` (``scb``) is the supervised variant: the component is the given
context ``k`` (``tau`` is one-hot), ``y = gamma (x - mu_k) / sqrt((v_k + eps)(pi_k + eps)) + beta``;
in evaluation without a context it falls back to the soft assignment above.

No Python loop over components: the component axis is a tensor dimension ``(N, K, C, S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedctx.norm._common import check_input, stats_dtype
from fedctx.norm.routing import ContextAware


def unsupervised_adaptive_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    prior: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Functional UAN.

    Args:
        x: ``(N, C, *spatial)``.
        mean, var: ``(K, C)`` component means and (positive) variances.
        prior: ``(K,)`` mixing weights (sum to one).
        weight, bias: ``(C,)`` or ``None``.
    """
    n, c = x.shape[:2]
    sd = stats_dtype(x.dtype)
    xs = x.to(sd).reshape(n, 1, c, -1)  # (N, 1, C, S)
    inv_std = torch.rsqrt(var.to(sd) + eps)  # (K, C)
    z = torch.addcmul((-mean.to(sd) * inv_std).unsqueeze(-1), xs, inv_std.unsqueeze(-1))
    log_prior = torch.log(prior.to(sd)).reshape(1, -1, 1, 1)
    tau = torch.softmax(torch.addcmul(log_prior, z, z, value=-0.5), dim=1)  # (N, K, C, S)
    coef = torch.rsqrt(prior.to(sd) + eps).reshape(1, -1, 1, 1)
    out = (tau * z * coef).sum(1)  # (N, C, S)
    return _affine(out, weight, bias).to(x.dtype).reshape(x.shape)


def _affine(out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    if weight is not None and bias is not None:
        return torch.addcmul(bias.unsqueeze(-1), out, weight.unsqueeze(-1))
    if weight is not None:
        out = out * weight.unsqueeze(-1)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return out


class UnsupervisedAdaptiveNorm(nn.Module):
    """UAN / UCB-Norm over ``(N, C, *spatial)`` inputs (see module docstring).

    Args:
        num_features: channels ``C``.
        num_components: Gaussian components ``K`` (default 3).
        eps: ``1e-3`` as in the paper.
        affine: per-channel ``gamma, beta`` after the mixture normalization.
    """

    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        eps: float = 1e-3,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self._build(num_features, num_components, eps, affine)

    def _build(self, num_features: int, num_components: int, eps: float, affine: bool) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.affine = affine
        self.mean = nn.Parameter(torch.empty(num_components, num_features))
        self.var_raw = nn.Parameter(torch.empty(num_components, num_features))
        self.prior_raw = nn.Parameter(torch.empty(num_components))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.mean, -1.0, 1.0)
        nn.init.uniform_(self.var_raw, 1e-3, 1e-2)
        nn.init.uniform_(self.prior_raw, 0.01, 0.99)
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

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
            x, self.mean, self.var, self.prior, self.weight, self.bias, self.eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        return self._soft(x)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
            f"affine={self.affine}"
        )


class SupervisedClusterNorm(UnsupervisedAdaptiveNorm, ContextAware):
    """SCB: :class:`UnsupervisedAdaptiveNorm` with the component given as the context.

    ``y_i = gamma (x_i - mu_k) / sqrt((v_k + eps)(pi_k + eps)) + beta`` with ``k = context(i)``;
    ``K = num_contexts``. In evaluation with no context set, the soft UAN assignment is used.
    """

    def __init__(
        self, num_features: int, num_contexts: int = 1, eps: float = 1e-3, affine: bool = True
    ) -> None:
        ContextAware.__init__(self, num_contexts)
        self._build(num_features, num_contexts, eps, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        ctx = self.resolve_contexts(x.shape[0], x.device)
        if ctx is None:
            return self._soft(x)
        n, c = x.shape[:2]
        sd = stats_dtype(x.dtype)
        scale = torch.rsqrt((self.var + self.eps) * (self.prior + self.eps).unsqueeze(1))  # (K,C)
        shift = -self.mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight
        if self.bias is not None:
            shift = shift + self.bias
        if isinstance(ctx, int):
            scale, shift = scale[ctx].expand(n, c), shift[ctx].expand(n, c)
        else:
            scale, shift = scale[ctx], shift[ctx]
        view = (n, c) + (1,) * (x.dim() - 2)
        out = torch.addcmul(shift.reshape(view).to(sd), x.to(sd), scale.reshape(view).to(sd))
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_contexts={self.num_contexts}, eps={self.eps}, " \
            f"affine={self.affine}"
