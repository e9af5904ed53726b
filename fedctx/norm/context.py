"""Context Normalization (Supervised Batch Normalization, SBN).

Faye et al., "Context Normalization Layer with Applications", arXiv:2405.17027 (SBN / CN).
Each context *k* has its own running mean and variance and (by default) its own affine
parameters. In training, the samples of context *k* are normalized with the mean and (biased)
variance of the context-*k* samples of the batch, taken over ``N_k * prod(spatial)`` values per
channel::

    y_i = gamma_k * (x_i - mu_k) / sqrt(var_k + eps) + beta_k,    k = context(i)

Running statistics follow ``torch.nn.BatchNorm`` (momentum convention of PyTorch, unbiased
variance in the running estimate), per context, updated only for contexts present in the batch.

Choices where the paper leaves a detail open (each tested):

* Defaults mirror ``nn.BatchNorm`` (``eps=1e-5``, ``momentum=0.1``), so ``num_contexts=1``
  reproduces ``nn.BatchNorm`` exactly. The authors' Keras defaults are ``eps=1e-3`` and
  momentum 0.99 in Keras' convention (= ``momentum=0.01`` here); pass them to match.
* The authors' code divides by ``sqrt(p_k)`` (a per-context prior); ``gamma_k`` absorbs that
  constant, so it is not a separate parameter here.
* Evaluation with no context set uses the mean over contexts of the running statistics and
  affine parameters (the paper's rule for an unknown context).
* In a training batch that mixes contexts, a context with fewer than ``min_batch_values``
  values per channel (its samples in the batch times the spatial positions) is normalized with
  its running statistics, which it leaves unchanged. fedctx's default is 8; the paper computes
  every present context's batch statistics (``min_batch_values=2``, the least that has a
  variance). Statistics over 2 values keep only a sign per channel (3 little more) and multiply
  some input gradients by up to ``1/sqrt(eps)``: clients whose mini-batches mix contexts trained
  badly with 2 (measured in ``docs/results/domain_mix.md``), not with 8. Only layers without
  (many) spatial positions are concerned: one image at a 7x7 feature map already brings 49.

The math is :func:`fedctx.norm.functional.context_batch_norm`. The mixed-batch path has no
Python loop over contexts: per-sample moments (two fast reductions, see
:func:`fedctx.norm._common.grouped_moments`) are merged per context with ``index_add`` and
gathered back per sample; its backward is written in closed form. A single ``int`` context
calls ``F.batch_norm`` directly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedctx.norm._common import (
    check_input,
    describe,
    group_counts,
    init_affine,
    init_running_stats,
    reset_affine,
    reset_running_stats,
)
from fedctx.norm.functional import context_batch_norm
from fedctx.norm.routing import ContextAware


class ContextNorm(ContextAware):
    """Context batch normalization over ``(N, C, *spatial)`` inputs.

    Args:
        num_features: channels ``C``.
        num_contexts: number of contexts ``K``.
        eps, momentum: as in ``nn.BatchNorm`` (PyTorch's momentum convention).
        affine: learn per-context ``gamma_k, beta_k`` (shape ``(K, C)``).
        shared_affine: one ``gamma, beta`` (shape ``(C,)``) shared by all contexts instead.
        track_running_stats: keep per-context running statistics ``(K, C)`` for evaluation.
        min_batch_values: least values per channel (samples of the context in the batch times
            spatial positions, at least 2) for a context's batch statistics in a mixed training
            batch; a context with fewer uses its running statistics (default 8; the paper: 2).
        device, dtype: of the parameters and buffers, as in ``torch.nn``.

    Shapes: input and output ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``
    (subclasses fix the rank). Contexts come from :func:`fedctx.norm.use_context`.
    """

    is_normalization: ClassVar[bool] = True
    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        num_contexts: int = 1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        shared_affine: bool = False,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        min_batch_values: int = 8,
    ) -> None:
        super().__init__(num_contexts)
        if not isinstance(momentum, float | int) or not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        if isinstance(min_batch_values, bool) or not isinstance(min_batch_values, int) or (
                min_batch_values < 2):
            raise ValueError(f"min_batch_values must be an int >= 2, got {min_batch_values!r}")
        self.min_batch_values = min_batch_values
        self.num_features = num_features
        self.eps = eps
        self.momentum = float(momentum)
        self.affine = affine
        self.shared_affine = shared_affine
        self.track_running_stats = track_running_stats
        stats_shape = (num_contexts, num_features)
        init_affine(self, affine, (num_features,) if shared_affine else stats_shape, device, dtype)
        init_running_stats(self, stats_shape if track_running_stats else None, (num_contexts,),
                           device=device, dtype=dtype)

    def reset_running_stats(self) -> None:
        reset_running_stats(self)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        ctx = self.resolve_contexts(x.shape[0], x.device)
        if self.training and self.track_running_stats and ctx is not None:
            with torch.no_grad():
                if isinstance(ctx, int):
                    self.num_batches_tracked[ctx] += 1
                else:
                    values = group_counts(ctx, self.num_contexts, torch.float32) * (
                        x[0, 0].numel())
                    # as the statistics move
                    self.num_batches_tracked.add_((values >= self.min_batch_values).long())
        return context_batch_norm(
            x, ctx, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps, self.num_contexts, self.min_batch_values,
        )

    def extra_repr(self) -> str:
        return describe(
            self, "num_contexts", "eps", "momentum", "affine", "shared_affine",
            "track_running_stats", "min_batch_values",
        )


class ContextNorm1d(ContextNorm):
    """:class:`ContextNorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    expected_dims = (2, 3)


class ContextNorm2d(ContextNorm):
    """:class:`ContextNorm` for ``(N, C, H, W)`` inputs."""

    expected_dims = (4,)


class ContextNorm3d(ContextNorm):
    """:class:`ContextNorm` for ``(N, C, D, H, W)`` inputs."""

    expected_dims = (5,)
