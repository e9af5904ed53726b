"""Weight Standardization + GroupNorm, as in Big Transfer (BiT).

Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019 (arXiv:1903.10520); Kolesnikov et al., "Big Transfer (BiT)",
ECCV 2020 (arXiv:1912.11370). The convolution standardizes each output filter of its weight::

    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)    over (in, kh, kw), biased var

and is followed by GroupNorm (32 groups). The two halves live in different places of a model,
so they are split: :class:`WSConv2d` is the conv side (use it instead of ``nn.Conv2d``) and
``make_norm('weightstd', C)`` returns the GroupNorm side (:class:`WSGroupNorm`, a plain
``nn.GroupNorm`` with 32 groups or the largest divisor of ``C`` below). ``eps = 1e-6`` (timm's
``StdConv2d``; BiT's code uses 1e-10). :func:`convert_ws_convs` swaps the convs of a model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fedctx.norm._common import resolve_groups
from fedctx.norm.functional import standardize_weight


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (same arguments, plus ``eps``)."""

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class WSGroupNorm(nn.GroupNorm):
    """The GroupNorm side of Weight Standardization + GroupNorm (a plain ``nn.GroupNorm``)."""

    is_normalization: ClassVar[bool] = True

    def __init__(
        self, num_features: int, num_groups: int | None = None, eps: float = 1e-5,
        affine: bool = True, device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        num_groups = resolve_groups(num_features, num_groups)
        super().__init__(num_groups, num_features, eps=eps, affine=affine, device=device,
                         dtype=dtype)


def convert_ws_convs(module: nn.Module, eps: float = 1e-6) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``module`` by a :class:`WSConv2d` with the same weights."""
    if type(module) is nn.Conv2d:
        new = WSConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None,
            module.padding_mode, eps=eps,
        ).to(module.weight.device, module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new
    for name, child in module.named_children():
        new_child = convert_ws_convs(child, eps)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


__all__ = ["WSConv2d", "WSGroupNorm", "convert_ws_convs", "standardize_weight"]
