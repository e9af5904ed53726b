"""Models that take ``norm=`` and ``num_contexts=``; build one by name with :func:`make_model`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedctx.models.digits import DigitsCNN
from fedctx.models.resnet import CifarResNet, resnet18, resnet20, resnet32
from fedctx.models.vit import ViT, vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet18": resnet18,
    "vit-tiny": vit_tiny,
}


def make_model(name: str, **kwargs: object) -> nn.Module:
    """Build model ``name`` (one of ``MODELS``) with ``norm=``, ``num_contexts=`` and options."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


__all__ = [
    "MODELS", "CifarResNet", "DigitsCNN", "ViT", "make_model", "resnet18", "resnet20", "resnet32",
    "vit_tiny",
]
