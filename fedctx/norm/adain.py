"""Conditional Instance Normalization (per-context affine instance norm; ``adain``).

Dumoulin, Shlens & Kudlur, "A Learned Representation for Artistic Style", ICLR 2017
(arXiv:1610.07629); the adaptive form is Huang & Belongie, "Arbitrary Style Transfer in
Real-time with Adaptive Instance Normalization", ICCV 2017 (arXiv:1703.06868). Each sample is
normalized over its own spatial positions, then scaled and shifted with the affine parameters of
its context (one ``gamma_k, beta_k`` per context, the learned-style form of AdaIN)::

    y_i = gamma_k * (x_i - mu_i) / sqrt(var_i + eps) + beta_k,   mu_i, var_i over spatial dims

Choices (each tested): no running statistics (train = eval, like ``nn.InstanceNorm`` by
default); evaluation without a context (``K > 1``) uses the mean of the per-context affine
parameters; needs at least one spatial dimension. No loop over contexts (``param[ids]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedctx.norm._common import check_input, describe, init_affine, reset_affine, stats_dtype
from fedctx.norm.acn import _per_sample
from fedctx.norm.routing import ContextAware


class ConditionalInstanceNorm(ContextAware):
    """Instance norm with per-context ``gamma_k, beta_k`` ``(K, C)`` over ``(N, C, *spatial)``."""

    expected_dims: tuple[int, ...] = (3, 4, 5)

    def __init__(self, num_features: int, num_contexts: int = 1, eps: float = 1e-5) -> None:
        super().__init__(num_contexts)
        self.num_features = num_features
        self.eps = eps
        init_affine(self, True, (num_contexts, num_features))

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        n, c = x.shape[:2]
        ctx = self.resolve_contexts(n, x.device)
        sd = stats_dtype(x.dtype)
        y = F.instance_norm(x.to(sd), eps=self.eps)
        view = (n, c) + (1,) * (x.dim() - 2)
        w = _per_sample(self.weight, ctx, n).to(sd).reshape(view)
        b = _per_sample(self.bias, ctx, n).to(sd).reshape(view)
        return torch.addcmul(b, y, w).to(x.dtype)

    def extra_repr(self) -> str:
        return describe(self, "num_contexts", "eps")
