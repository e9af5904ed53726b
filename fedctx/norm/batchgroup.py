"""Batch Group Normalization (BGN).

Zhou, Sun, Li & Wang, "Towards Better Normalization: Batch Group Normalization", 2020
(arXiv:2012.02782). The channel and spatial dimensions are merged and split into ``G`` groups;
each group is normalized with statistics over the batch and the group::

    x -> (N, G, C/G * prod(spatial)),   mu_g, var_g over (N, C/G * prod(spatial))
    y = gamma_c * (x - mu_g) / sqrt(var_g + eps) + beta_c

Choices (each tested): groups are made of whole channels (``G`` must divide ``C``; default the
largest divisor of C that is <= 32, as GroupNorm here), so the affine stays per channel; running
statistics ``(G,)`` as in ``nn.BatchNorm`` for evaluation. ``G = C`` is ``nn.BatchNorm``. The
math is :func:`fedctx.norm.functional.batch_group_norm` (the affine folded into the one pass
out, closed-form backward).
"""

from __future__ import annotations

from typing import Any

import torch

from fedctx.norm._common import BatchStatsNorm, check_input, describe, resolve_groups
from fedctx.norm.functional import batch_group_norm


class BatchGroupNorm(BatchStatsNorm):
    """Batch Group Normalization over ``(N, C, *spatial)`` (see module docstring)."""

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        num_groups = resolve_groups(num_features, num_groups)
        super().__init__(num_features, eps, momentum, affine, stats_shape=(num_groups,),
                         device=device, dtype=dtype)
        self.num_groups = num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        if self.training:
            self.num_batches_tracked.add_(1)
        return batch_group_norm(
            x, self.num_groups, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )

    def extra_repr(self) -> str:
        return describe(self, "num_groups", "eps", "momentum", "affine")
