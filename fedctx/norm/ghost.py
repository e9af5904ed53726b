"""Ghost Batch Normalization.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in
large batch training of neural networks", NeurIPS 2017 (arXiv:1705.08741). In training the batch
is split into consecutive *ghost* batches of ``virtual_batch_size`` samples, each normalized with
its own statistics; evaluation uses running statistics as ``nn.BatchNorm``::

    y_i = gamma * (x_i - mu_g) / sqrt(var_g + eps) + beta,    g = floor(i / virtual_batch_size)

Choices (each tested): a last, smaller ghost batch takes the remainder;
``N <= virtual_batch_size`` is exactly ``nn.BatchNorm``. No loop over ghost batches: the math
(:func:`fedctx.norm.functional.ghost_batch_norm`) is the context-batch-norm kernel with context
``i // size``.

Running statistics (``running_stats=``, PyTorch momentum convention, unbiased variance):
``"sequential"`` (default) matches the authors' code (Hoffer et al.'s ``main_gbn.py`` runs the
model on each ghost batch in turn with a plain ``BatchNorm``, so the running statistics take one
momentum step per ghost batch, in batch order): with ``G`` ghost batches and ``m`` the momentum,
``running <- (1 - m)^G running + sum_g m (1 - m)^(G - 1 - g) stat_g``, computed in closed form.
``"mean"`` (fedctx's former default) takes one step per forward with the mean over ghost
batches of their statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from fedctx.norm._common import BatchStatsNorm, check_input, describe
from fedctx.norm.functional import ghost_batch_norm


class GhostBatchNorm(BatchStatsNorm):
    """Ghost BatchNorm over ``(N, C, *spatial)`` (see module docstring).

    Args:
        num_features: channels ``C``.
        virtual_batch_size: samples per ghost batch (default 32).
        eps, momentum, affine: as in ``nn.BatchNorm``.
        running_stats: ``"sequential"`` (one momentum step per ghost batch, the authors' code)
            or ``"mean"`` (one step with the mean of the ghost batches' statistics).
        device, dtype: of the parameters and buffers, as in ``torch.nn``.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        running_stats: str = "sequential",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size}")
        if running_stats not in ("sequential", "mean"):
            raise ValueError(
                f"running_stats must be 'sequential' or 'mean', got {running_stats!r}"
            )
        super().__init__(num_features, eps, momentum, affine, device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size
        self.running_stats = running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        if self.training:
            self.num_batches_tracked.add_(1)
        return ghost_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps, self.virtual_batch_size, self.running_stats,
        )

    def extra_repr(self) -> str:
        return describe(self, "virtual_batch_size", "eps", "momentum", "affine", "running_stats")
