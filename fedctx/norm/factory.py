"""Build any normalization layer by name: ``make_norm("context", 64, num_contexts=4)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from fedctx.norm.acn import AdaptiveContextNorm
from fedctx.norm.adain import ConditionalInstanceNorm
from fedctx.norm.batchgroup import BatchGroupNorm
from fedctx.norm.context import ContextNorm1d, ContextNorm2d, ContextNorm3d
from fedctx.norm.crossiter import CrossIterationBatchNorm
from fedctx.norm.ghost import GhostBatchNorm
from fedctx.norm.mixture import MixtureNorm
from fedctx.norm.proxy import ProxyNorm
from fedctx.norm.uan import SupervisedClusterNorm, UnsupervisedAdaptiveNorm
from fedctx.norm.weightstd import WSGroupNorm

NormBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, NormBuilder] = {}


def register_norm(name: str) -> Callable[[NormBuilder], NormBuilder]:
    """Register ``builder(num_features, *, dims, num_contexts, **options)`` under ``name``."""

    def decorator(builder: NormBuilder) -> NormBuilder:
        if name in _REGISTRY:
            raise ValueError(f"a norm named {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available() -> list[str]:
    """Names accepted by :func:`make_norm`, sorted."""
    return sorted(_REGISTRY)


def _check_dims(dims: int, allowed: tuple[int, ...], name: str) -> None:
    if dims not in allowed:
        raise ValueError(f"norm {name!r} supports dims in {allowed}, got dims={dims}")


def _call_checked(name: str, cls: Callable[..., nn.Module], *args: object, **options: object):
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = sorted(p for p in params if p not in ("num_features", "num_channels", "self"))
        raise ValueError(f"norm {name!r} got unknown option(s) {unknown}; valid options: {valid}")
    return cls(*args, **options)


def make_norm(
    name: str, num_features: int, *, dims: int = 2, num_contexts: int = 1, **options: object
) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_features`` channels.

    Args:
        name: one of :func:`available`.
        num_features: channels ``C`` of the ``(N, C, ...)`` input.
        dims: spatial rank: 0 for ``(N, C)`` features, 1 for ``(N, C, L)``, 2 for images
            ``(N, C, H, W)``, 3 for volumes.
        num_contexts: contexts ``K`` for context-aware layers (ignored by the others).
        options: layer-specific keyword arguments (``eps``, ``momentum``, ``affine``, ...).

    Raises:
        ValueError: unknown name or option, naming the valid choices.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; valid choices: {', '.join(available())}")
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not isinstance(num_contexts, int) or num_contexts < 1:
        raise ValueError(f"num_contexts must be a positive int, got {num_contexts!r}")
    if dims not in (0, 1, 2, 3):
        raise ValueError(f"dims must be one of 0, 1, 2, 3, got {dims!r}")
    return _REGISTRY[name](num_features, dims=dims, num_contexts=num_contexts, **options)


def norm_layer(name: str, *, dims: int = 2, num_contexts: int = 1, **options: object):
    """A ``norm_layer`` callable for torchvision: ``resnet18(norm_layer=norm_layer(...))``."""
    make_norm(name, 8, dims=dims, num_contexts=num_contexts, **options)  # validate eagerly
    return partial(make_norm, name, dims=dims, num_contexts=num_contexts, **options)


_BATCH = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_CONTEXT = {0: ContextNorm1d, 1: ContextNorm1d, 2: ContextNorm2d, 3: ContextNorm3d}


@register_norm("batch")
def _batch(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    _check_dims(dims, tuple(_BATCH), "batch")
    return _call_checked("batch", _BATCH[dims], num_features, **options)


@register_norm("context")
def _context(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    _check_dims(dims, tuple(_CONTEXT), "context")
    return _call_checked(
        "context", _CONTEXT[dims], num_features, num_contexts=num_contexts, **options
    )


def _groups_for(num_features: int, wanted: int) -> int:
    groups = min(wanted, num_features)
    while num_features % groups:
        groups -= 1
    return groups


@register_norm("group")
def _group(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    """GroupNorm (Wu & He 2018); ``num_groups`` defaults to the largest divisor of C <= 32."""
    num_groups = options.pop("num_groups", _groups_for(num_features, 32))
    if not isinstance(num_groups, int) or num_features % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must divide num_features={num_features}")
    return _call_checked("group", nn.GroupNorm, num_groups, num_features, **options)


@register_norm("layer")
def _layer(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    """LayerNorm over (C, *spatial) per sample, as GroupNorm with one group (per-channel affine)."""
    if dims == 0:
        return _call_checked("layer", nn.LayerNorm, num_features, **options)
    return _call_checked("layer", nn.GroupNorm, 1, num_features, **options)


@register_norm("instance")
def _instance(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    """InstanceNorm (Ulyanov et al. 2016); affine on by default here."""
    _check_dims(dims, tuple(_INSTANCE), "instance")
    options.setdefault("affine", True)
    return _call_checked("instance", _INSTANCE[dims], num_features, **options)


@register_norm("none")
def _identity(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    if options:
        raise ValueError(f"norm 'none' takes no options, got {sorted(options)}")
    return nn.Identity()


def _register_simple(
    name: str, cls: Callable[..., nn.Module], *, context_aware: bool = False,
    dims: tuple[int, ...] = (0, 1, 2, 3),
) -> None:
    def builder(num_features: int, *, dims: int, num_contexts: int, **options: object):
        _check_dims(dims, allowed, name)
        if context_aware:
            options["num_contexts"] = num_contexts
        return _call_checked(name, cls, num_features, **options)

    allowed = dims
    builder.__doc__ = cls.__doc__
    register_norm(name)(builder)


_register_simple("acn", AdaptiveContextNorm, context_aware=True)
_register_simple("uan", UnsupervisedAdaptiveNorm)
_register_simple("scb", SupervisedClusterNorm, context_aware=True)
_register_simple("mixture", MixtureNorm)
_register_simple("proxy", ProxyNorm)
_register_simple("ghost", GhostBatchNorm)
_register_simple("batchgroup", BatchGroupNorm)
_register_simple("crossiter", CrossIterationBatchNorm)
_register_simple("weightstd", WSGroupNorm)
_register_simple("adain", ConditionalInstanceNorm, context_aware=True, dims=(1, 2, 3))
