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
from torch import nn

from fedctx.norm._common import check_input, default_groups


class BatchGroupNorm(nn.Module):
    """Batch Group Normalization over ``(N, C, *spatial)`` (see module docstring)."""

    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if num_groups is None:
            num_groups = default_groups(num_features)
        if not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups:
            raise ValueError(f"num_groups={num_groups!r} must divide num_features={num_features}")
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        n, c = x.shape[:2]
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            x.reshape(n, self.num_groups, -1), self.running_mean, self.running_var, None, None,
            self.training, self.momentum, self.eps,
        ).reshape(x.shape)
        if self.weight is None:
            return y
        view = (1, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(view), y, self.weight.view(view))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )
