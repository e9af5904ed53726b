"""Adaptive Context Normalization (ACN, also SCB-Norm / CN-X).

Faye et al., "Adaptive Context Normalization: A Boost for Deep Learning in Image Processing",
ICIP 2024 (arXiv:2409.04759). The same computation is published as SCB-Norm (supervised
cluster-based normalization, the clusters being the contexts): in the authors' code both are
this layer, so ``make_norm('scb', ...)`` and ``make_norm('acn', ...)`` build the same class
(:data:`SupervisedClusterNorm` is an alias of :class:`AdaptiveContextNorm`).

Each context *k* owns a mean ``mu_k`` and a log-scale ``s_k`` per
channel, learned by backpropagation as ordinary weights; no batch statistics are used, so the
output of a sample does not depend on the rest of the batch::

    y_i = (x_i - mu_k) / (exp(s_k) + eps),    k = context(i)

Choices where the paper leaves a detail open (each tested):

* ``mu`` and ``log_scale`` have shape ``(K, C)`` and are Xavier-uniform initialised (the
  authors' Keras code), ``eps = 1e-3``; no ``gamma``/``beta`` unless ``affine=True`` (then one
  ``(K, C)`` pair per context, initialised to the identity).
* Evaluation with no context set (``K > 1``) uses the mean over contexts of ``mu`` and of
  ``log_scale`` (i.e. the geometric mean of the scales) and of the affine parameters.

There is no Python loop over contexts: per-sample parameters are gathered with ``param[ids]``;
the math is :func:`fedctx.norm.functional.adaptive_context_norm` (one pass over the input,
closed-form backward).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fedctx.norm._common import check_input, describe, init_affine, reset_affine
from fedctx.norm.functional import adaptive_context_norm
from fedctx.norm.routing import ContextAware


class AdaptiveContextNorm(ContextAware):
    """Adaptive Context Normalization over ``(N, C, *spatial)`` inputs (see module docstring).

    Args:
        num_features: channels ``C``.
        num_contexts: contexts ``K``.
        eps: added to ``exp(s_k)`` (authors: ``1e-3``).
        affine: also learn per-context ``gamma_k, beta_k`` (off in the paper).
        device, dtype: of the parameters, as in ``torch.nn``.
    """

    is_normalization: ClassVar[bool] = True
    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self, num_features: int, num_contexts: int = 1, eps: float = 1e-3, affine: bool = False,
        device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_contexts)
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        shape = (num_contexts, num_features)
        self.mean = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.log_scale = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        init_affine(self, affine, shape, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.mean)
        nn.init.xavier_uniform_(self.log_scale)
        reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        ctx = self.resolve_contexts(x.shape[0], x.device)
        return adaptive_context_norm(
            x, ctx, self.mean, self.log_scale, self.weight, self.bias, self.eps
        )

    def extra_repr(self) -> str:
        return describe(self, "num_contexts", "eps", "affine")


#: SCB-Norm (supervised cluster-based normalization): ACN's computation in the authors' code.
SupervisedClusterNorm = AdaptiveContextNorm
