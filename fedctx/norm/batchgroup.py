"""Batch Group Normalization (BGN).

Zhou, Sun, Li & Wang, "Towards Better Normalization: Batch Group Normalization", 2020
(arXiv:2012.02782). The channel and spatial dimensions are merged and split into ``G`` groups;
each group is normalized with statistics over the batch and the group::

    x -> (N, G, C/G * prod(spatial)),   mu_g, var_g over (N, C/G * prod(spatial))
    y = gamma_c * (x - mu_g) / sqrt(var_g + eps) + beta_c

Choices (each tested): groups are made of whole channels (``G`` must divide ``C``; default the
largest divisor of C that is <= 32, as GroupNorm here), so the affine stays per channel; running
statistics ``(G,)`` as in ``nn.BatchNorm`` for evaluation. ``G = C`` is ``nn.BatchNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedctx.norm._common import (
    BatchStatsNorm,
    apply_affine,
    check_input,
    describe,
    resolve_groups,
)


class BatchGroupNorm(BatchStatsNorm):
    """Batch Group Normalization over ``(N, C, *spatial)`` (see module docstring)."""

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        num_groups = resolve_groups(num_features, num_groups)
        super().__init__(num_features, eps, momentum, affine, stats_shape=(num_groups,))
        self.num_groups = num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            x.reshape(x.shape[0], self.num_groups, -1), self.running_mean, self.running_var,
            None, None, self.training, self.momentum, self.eps,
        ).reshape(x.shape)
        return apply_affine(y, self.weight, self.bias)

    def extra_repr(self) -> str:
        return describe(self, "num_groups", "eps", "momentum", "affine")
