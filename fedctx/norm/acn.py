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

There is no Python loop over contexts: per-sample parameters are gathered with ``param[ids]``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedctx.norm._common import check_input, describe, fold_affine, init_affine, reset_affine
from fedctx.norm.routing import ContextAware, Contexts


def _per_sample(param: torch.Tensor, ctx: Contexts | None, n: int) -> torch.Tensor:
    """``(N, C)`` rows of a ``(K, C)`` parameter: gathered, selected, or averaged (no context)."""
    if ctx is None:
        row = param.mean(0)
    elif isinstance(ctx, int):
        row = param[ctx]
    else:
        return param[ctx]
    return row.unsqueeze(0).expand(n, -1)


def adaptive_context_norm(
    x: torch.Tensor,
    contexts: Contexts | None,
    mean: torch.Tensor,
    log_scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Functional ACN: ``(x - mean[k]) / (exp(log_scale[k]) + eps) * weight[k] + bias[k]``.

    Args:
        x: ``(N, C, *spatial)``.
        contexts: ``int``, ``LongTensor[N]`` or ``None`` (mean of the per-context entries).
        mean, log_scale, weight, bias: ``(K, C)`` (``weight``/``bias`` may be ``None``).
    """
    n, c = x.shape[:2]
    scale = 1.0 / (torch.exp(_per_sample(log_scale, contexts, n)) + eps)
    w, b = (None if p is None else _per_sample(p, contexts, n) for p in (weight, bias))
    scale, shift = fold_affine(scale, -_per_sample(mean, contexts, n) * scale, w, b)
    view = (n, c) + (1,) * (x.dim() - 2)
    out = torch.addcmul(shift.reshape(view), x.to(scale.dtype), scale.reshape(view))
    return out.to(x.dtype)


class AdaptiveContextNorm(ContextAware):
    """Adaptive Context Normalization over ``(N, C, *spatial)`` inputs (see module docstring).

    Args:
        num_features: channels ``C``.
        num_contexts: contexts ``K``.
        eps: added to ``exp(s_k)`` (authors: ``1e-3``).
        affine: also learn per-context ``gamma_k, beta_k`` (off in the paper).
    """

    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self, num_features: int, num_contexts: int = 1, eps: float = 1e-3, affine: bool = False
    ) -> None:
        super().__init__(num_contexts)
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.mean = nn.Parameter(torch.empty(num_contexts, num_features))
        self.log_scale = nn.Parameter(torch.empty(num_contexts, num_features))
        init_affine(self, affine, (num_contexts, num_features))
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
