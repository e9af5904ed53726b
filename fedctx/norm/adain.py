"""Conditional Instance Normalization (per-context affine instance norm; ``adain``).

Dumoulin, Shlens & Kudlur, "A Learned Representation for Artistic Style", ICLR 2017
(arXiv:1610.07629); the adaptive form is Huang & Belongie, "Arbitrary Style Transfer in
Real-time with Adaptive Instance Normalization", ICCV 2017 (arXiv:1703.06868). Each sample is
normalized over its own spatial positions, then scaled and shifted with the affine parameters of
its context (one ``gamma_k, beta_k`` per context, the learned-style form of AdaIN)::

    y_i = gamma_k * (x_i - mu_i) / sqrt(var_i + eps) + beta_k,   mu_i, var_i over spatial dims

Choices (each tested): no running statistics (train = eval, like ``nn.InstanceNorm`` by
default); evaluation without a context (``K > 1``) uses the mean of the per-context affine
parameters; needs at least one spatial dimension. No loop over contexts (``param[ids]``). The
math is :func:`fedctx.norm.functional.conditional_instance_norm`: per-sample moments, one pass
out with the context's affine folded in, closed-form backward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedctx.norm._common import check_input, describe, init_affine, reset_affine
from fedctx.norm.functional import conditional_instance_norm
from fedctx.norm.routing import ContextAware


class ConditionalInstanceNorm(ContextAware):
    """Instance norm with per-context ``gamma_k, beta_k`` ``(K, C)`` over ``(N, C, *spatial)``
    (``device``/``dtype``: of the parameters, as in ``torch.nn``)."""

    is_normalization: ClassVar[bool] = True
    expected_dims: tuple[int, ...] = (3, 4, 5)

    def __init__(
        self, num_features: int, num_contexts: int = 1, eps: float = 1e-5, device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_contexts)
        self.num_features = num_features
        self.eps = eps
        init_affine(self, True, (num_contexts, num_features), device, dtype)

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        ctx = self.resolve_contexts(x.shape[0], x.device)
        return conditional_instance_norm(x, ctx, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return describe(self, "num_contexts", "eps")
