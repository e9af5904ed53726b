"""ResNets for 32x32 images (CIFAR) whose normalization layers are chosen by name.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016: the CIFAR
ResNet-20/32/56 (3 stages of 16/32/64 channels, ``(depth - 2) / 6`` basic blocks each, option A
identity shortcuts replaced by 1x1 projections) and the ResNet-18 layout for 32x32 inputs
(3x3 stem, no max-pool, stages of 64/128/256/512 channels).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from fedctx.norm import NormAct, conv2d_class, make_norm_act


class BasicBlock(nn.Module):
    """Two 3x3 convs with a norm after each and a (projected) residual.

    ``conv1 -> bn1 -> act1`` is a norm -> activation pair (``make(c, "relu")``); ``bn2`` (before
    the residual addition) and the shortcut's norm have no activation after them
    (``make(c, None)``); the ReLU after the addition is not a norm's activation.
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int, make: Callable[[int, str | None], NormAct],
        conv: Callable[..., nn.Conv2d] = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1, self.act1 = make(c_out, "relu")
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = make(c_out, None).norm
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv(c_in, c_out, 1, stride, bias=False), make(c_out, None).norm
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for ``(N, 3, 32, 32)`` inputs; ``norm`` is any :func:`fedctx.norm.available` name.

    Norms are built with :func:`fedctx.norm.make_norm_act`: a norm followed by a ReLU (stem,
    first norm of each block) as a norm -> activation pair, the others (before the residual
    addition, on the shortcut) with no activation, so ``proxy`` is Proxy Norm only where an
    activation follows and its base GroupNorm elsewhere. Convolutions are
    :func:`fedctx.norm.conv2d_class` of the norm (``weightstd``: ``WSConv2d``).

    Args:
        num_classes: output logits.
        norm: normalization layer name; ``num_contexts`` sizes context-aware norms; extra keyword
            arguments are that norm's options.
        stages: blocks per stage; ``widths``: channels per stage.
        device, dtype: of every parameter and buffer, as in ``torch.nn``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        norm: str = "batch",
        num_contexts: int = 1,
        stages: tuple[int, ...] = (3, 3, 3),
        widths: tuple[int, ...] = (16, 32, 64),
        in_channels: int = 3,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **norm_options: object,
    ) -> None:
        super().__init__()
        if len(stages) != len(widths):
            raise ValueError("stages and widths must have the same length")
        fk = {"device": device, "dtype": dtype}

        def make(c: int, activation: str | None) -> NormAct:
            return make_norm_act(norm, c, activation, dims=2, num_contexts=num_contexts,
                                 **fk, **norm_options)

        conv = partial(conv2d_class(norm), **fk)  # WSConv2d for ``weightstd``
        self.stem = nn.Sequential(
            conv(in_channels, widths[0], 3, 1, 1, bias=False), *make(widths[0], "relu"),
        )
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, c) in enumerate(zip(stages, widths, strict=True)):
            for j in range(n):
                blocks.append(BasicBlock(c_in, c, 2 if (j == 0 and i > 0) else 1, make=make,
                                         conv=conv))
                c_in = c
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes, **fk)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet20(num_classes: int = 10, *, width: int = 16, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-20 (0.27 M parameters at ``width=16``)."""
    return CifarResNet(num_classes, stages=(3, 3, 3), widths=(width, 2 * width, 4 * width),
                       **kwargs)


def resnet32(num_classes: int = 10, *, width: int = 16, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-32."""
    return CifarResNet(num_classes, stages=(5, 5, 5), widths=(width, 2 * width, 4 * width),
                       **kwargs)


def resnet18(num_classes: int = 10, *, width: int = 64, **kwargs: object) -> CifarResNet:
    """ResNet-18 layout for 32x32 inputs (11 M parameters at ``width=64``)."""
    widths = (width, 2 * width, 4 * width, 8 * width)
    return CifarResNet(num_classes, stages=(2, 2, 2, 2), widths=widths, **kwargs)
