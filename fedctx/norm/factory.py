"""Build any normalization layer by name: ``make_norm("context", 64, num_contexts=4)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

from torch import nn

from fedctx.norm._common import resolve_groups
from fedctx.norm.acn import AdaptiveContextNorm
from fedctx.norm.adain import ConditionalInstanceNorm
from fedctx.norm.batchgroup import BatchGroupNorm
from fedctx.norm.context import ContextNorm1d, ContextNorm2d, ContextNorm3d
from fedctx.norm.crossiter import CrossIterationBatchNorm
from fedctx.norm.ghost import GhostBatchNorm
from fedctx.norm.mixture import MixtureNorm
from fedctx.norm.proxy import ProxyNorm
from fedctx.norm.uan import UnsupervisedAdaptiveNorm
from fedctx.norm.weightstd import WSConv2d, WSGroupNorm

NormBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """What the registry knows about a norm name, besides how to build it.

    Attributes:
        builder: ``builder(num_features, *, dims, num_contexts, **options)``.
        train_defaults: recommended training options for this norm, as ``SimConfig`` option
            names (``{"lr": 0.01}``); ``fedctx.config`` applies them above the scenario's
            defaults and below ``--config`` files and flags.
        why: one line saying why the defaults differ from the scenario's (for the docs).
        fuses_activation: ``builder`` takes ``activation=`` and returns ``phi(norm(x))`` (Proxy
            Norm): a model must not add an activation after it.
        without_activation: for a fused norm, the builder of the layer a model uses where no
            activation follows the norm (Proxy Norm: its base GroupNorm / LayerNorm).
        weight_standardized_convs: models build their convolutions as ``WSConv2d``.
    """

    builder: NormBuilder
    train_defaults: Mapping[str, object] = field(default_factory=dict)
    why: str = ""
    fuses_activation: bool = False
    without_activation: NormBuilder | None = None
    weight_standardized_convs: bool = False


_REGISTRY: dict[str, NormSpec] = {}
#: Classes registered with :func:`register_norm`: their instances are normalization modules.
_NORM_CLASSES: set[type[nn.Module]] = set()

#: ``torch.nn`` normalization classes (their subclasses included).
_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module``'s own parameters and buffers are normalization state.

    True for ``torch.nn`` batch/instance/group/layer/local-response/RMS norms, for classes that
    declare ``is_normalization = True`` (every fedctx norm layer), and for classes registered
    with :func:`register_norm` (a third-party norm) and their subclasses; never for convolutions
    and linear layers (e.g. ``WSConv2d``'s weight is a shared weight). Decided by the class, not
    by where it is defined. Used by the state split (:mod:`fedctx.federated.params`) and weight
    decay (:mod:`fedctx.optim`) alike.
    """
    if isinstance(module, _TORCH_NORMS):
        return True
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        return False
    return bool(getattr(type(module), "is_normalization", False)) or isinstance(
        module, tuple(_NORM_CLASSES)
    )


def register_norm(
    name: str,
    *,
    train_defaults: Mapping[str, object] | None = None,
    why: str = "",
    fuses_activation: bool = False,
    without_activation: NormBuilder | None = None,
    weight_standardized_convs: bool = False,
) -> Callable[[NormBuilder], NormBuilder]:
    """Register ``builder(num_features, *, dims, num_contexts, **options)`` under ``name``.

    ``builder`` may also be an ``nn.Module`` class taking ``num_features`` first (and
    ``num_contexts`` if it is context-aware): ``make_norm(name, C, **options)`` then builds
    ``cls(C, **options)``, and its instances count as normalization modules
    (:func:`is_norm_module`: their state is norm state for the norm policies and gets no weight
    decay). Keyword arguments are declared data about the norm (see :class:`NormSpec`), e.g.
    ``@register_norm("acn", train_defaults={"lr": 0.01}, why="no batch statistics")``.
    """
    if fuses_activation != (without_activation is not None):
        raise ValueError("a norm that fuses its activation needs a without_activation builder "
                         "(and only such a norm takes one)")

    def decorator(builder: NormBuilder) -> NormBuilder:
        if name in _REGISTRY:
            raise ValueError(f"a norm named {name!r} is already registered")
        build = builder
        if isinstance(builder, type) and issubclass(builder, nn.Module):
            _NORM_CLASSES.add(builder)
            build = _class_builder(name, builder)
        _REGISTRY[name] = NormSpec(
            build, dict(train_defaults or {}), why, fuses_activation, without_activation,
            weight_standardized_convs,
        )
        return builder

    return decorator


def _spec(name: str) -> NormSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; valid choices: {', '.join(available())}")
    return _REGISTRY[name]


def norm_spec(name: str) -> NormSpec:
    """The registry entry of ``name`` (``ValueError`` naming the valid choices if unknown)."""
    return _spec(name)


def train_defaults(name: str) -> dict[str, object]:
    """Recommended training options for norm ``name`` (``SimConfig`` names; may be empty)."""
    return dict(_spec(name).train_defaults)


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
    spec = _check_args(name, num_features, dims, num_contexts)
    return spec.builder(num_features, dims=dims, num_contexts=num_contexts, **options)


def _check_args(name: str, num_features: int, dims: int, num_contexts: int) -> NormSpec:
    spec = _spec(name)
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not isinstance(num_contexts, int) or num_contexts < 1:
        raise ValueError(f"num_contexts must be a positive int, got {num_contexts!r}")
    if dims not in (0, 1, 2, 3):
        raise ValueError(f"dims must be one of 0, 1, 2, 3, got {dims!r}")
    return spec


#: Activation modules a model can ask to follow a norm (:func:`make_norm_act`).
ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
}


class NormAct(NamedTuple):
    """A norm and the activation that follows it; ``nn.Sequential(*pair)`` is ``act(norm(x))``.

    For a norm that fuses its activation (``proxy``) ``act`` is ``nn.Identity``; with no
    activation asked for, ``act`` is ``nn.Identity`` and ``norm`` the layer meant for that place.
    """

    norm: nn.Module
    act: nn.Module


def make_norm_act(
    name: str, num_features: int, activation: str | None, *, dims: int = 2,
    num_contexts: int = 1, **options: object,
) -> NormAct:
    """The norm ``name`` for a place of a model followed by ``activation`` (or by none).

    Models build every norm through this, so that each norm goes where its paper puts it:

    * ``activation="relu"`` (any of :data:`ACTIVATION_MODULES`): ``(make_norm(...), ReLU)``;
      for a norm that fuses its activation (``proxy``: Proxy Normalization replaces a
      norm -> activation pair) ``(ProxyNorm(activation='relu'), Identity)``.
    * ``activation=None`` (the norm before a residual addition, a shortcut's norm, a
      transformer's pre-norm): ``(make_norm(...), Identity)``; for a fused norm its plain
      batch-independent base (``proxy``: GroupNorm / LayerNorm; the proxy-only options
      ``activation``, ``n_quantiles``, ``proxy_eps`` are accepted and unused).

    Raises:
        ValueError: unknown name, option or activation, naming the valid choices.
    """
    spec = _check_args(name, num_features, dims, num_contexts)
    if activation is not None and activation not in ACTIVATION_MODULES:
        raise ValueError(f"unknown activation {activation!r}; valid choices: "
                         f"{', '.join(ACTIVATION_MODULES)}")
    if activation is None:
        builder = spec.without_activation if spec.fuses_activation else spec.builder
        norm = builder(num_features, dims=dims, num_contexts=num_contexts, **options)
        return NormAct(norm, nn.Identity())
    if spec.fuses_activation:
        if "activation" in options:
            raise ValueError(f"norm {name!r}: give the activation as make_norm_act's argument, "
                             "not as an option")
        norm = spec.builder(num_features, dims=dims, num_contexts=num_contexts,
                            activation=activation, **options)
        return NormAct(norm, nn.Identity())
    norm = spec.builder(num_features, dims=dims, num_contexts=num_contexts, **options)
    return NormAct(norm, ACTIVATION_MODULES[activation]())


def conv2d_class(name: str) -> type[nn.Conv2d]:
    """The convolution class models use with norm ``name``: ``WSConv2d`` for norms declared
    with ``weight_standardized_convs`` (``weightstd``), else ``nn.Conv2d``."""
    return WSConv2d if _spec(name).weight_standardized_convs else nn.Conv2d


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


def _num_groups(num_features: int, dims: int, options: dict[str, object]) -> int:
    """Pop ``num_groups`` from ``options`` (default :func:`default_groups` for ``dims``)."""
    return resolve_groups(num_features, options.pop("num_groups", None), dims)  # type: ignore[arg-type]


@register_norm("group")
def _group(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    """GroupNorm (Wu & He 2018); ``num_groups`` defaults to the largest divisor of C <= 32, and
    for ``(N, C)`` features (``dims=0``) to at most C / 16 groups (``default_groups``)."""
    num_groups = _num_groups(num_features, dims, options)
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
    options.pop("device", None)  # no state to place
    options.pop("dtype", None)
    if options:
        raise ValueError(f"norm 'none' takes no options, got {sorted(options)}")
    return nn.Identity()


def _class_builder(
    name: str, cls: type[nn.Module], allowed: tuple[int, ...] = (0, 1, 2, 3)
) -> NormBuilder:
    """The builder of a registered class: ``cls(num_features, [num_contexts=K,] **options)``."""
    context_aware = "num_contexts" in inspect.signature(cls).parameters

    def builder(num_features: int, *, dims: int, num_contexts: int, **options: object):
        _check_dims(dims, allowed, name)
        if context_aware:
            options["num_contexts"] = num_contexts
        return _call_checked(name, cls, num_features, **options)

    builder.__doc__ = cls.__doc__
    return builder


def _register_simple(
    name: str, cls: type[nn.Module], *, dims: tuple[int, ...] = (0, 1, 2, 3), **spec: object,
) -> None:
    register_norm(name, **spec)(_class_builder(name, cls, dims))  # type: ignore[arg-type]
    _NORM_CLASSES.add(cls)


_ACN_WHY = ("no batch statistics: nothing rescales the activations during training, so a "
            "smaller step (measured on the default scenario, seed 0: 0.54 / 0.61 / 0.58 test "
            "accuracy at lr 0.05 / 0.02 / 0.01)")
_register_simple("acn", AdaptiveContextNorm, train_defaults={"lr": 0.02}, why=_ACN_WHY)
# SCB-Norm (supervised cluster-based) is ACN's computation in the authors' code: one class.
_register_simple("scb", AdaptiveContextNorm, train_defaults={"lr": 0.02},
                 why="SCB-Norm is ACN: " + _ACN_WHY)
_register_simple("uan", UnsupervisedAdaptiveNorm)
_register_simple("mixture", MixtureNorm)
_register_simple("ghost", GhostBatchNorm)
_register_simple("batchgroup", BatchGroupNorm)
_register_simple(
    "crossiter", CrossIterationBatchNorm, train_defaults={"lr": 0.005},
    why=("stale statistics of the previous iterations are used without the paper's Taylor "
         "compensation, so they lag the weights by more the larger the step (measured on the "
         "default scenario, seed 0: 0.30 / 0.34 / 0.49 / 0.53 test accuracy at lr 0.05 / "
         "0.02 / 0.01 / 0.005)"),
)
_register_simple("adain", ConditionalInstanceNorm, dims=(1, 2, 3))


_PROXY_ONLY = ("activation", "n_quantiles", "proxy_eps")


def _proxy_base(num_features: int, *, dims: int, num_contexts: int, **options: object
                ) -> nn.Module:
    """Proxy Norm's base norm, for places where no activation follows (see ``make_norm_act``)."""
    _call_checked("proxy", ProxyNorm, num_features, **options)  # same options, same checks
    for key in _PROXY_ONLY:
        options.pop(key, None)
    if options.pop("base", "group") == "layer":
        options.pop("num_groups", None)
        return nn.GroupNorm(1, num_features, **options)  # type: ignore[arg-type]
    num_groups = _num_groups(num_features, dims, options)
    return nn.GroupNorm(num_groups, num_features, **options)  # type: ignore[arg-type]


@register_norm("proxy", fuses_activation=True, without_activation=_proxy_base)
def _proxy(num_features: int, *, dims: int, num_contexts: int, **options: object) -> nn.Module:
    """Proxy Norm (norm + activation, see :class:`ProxyNorm`); default groups as ``group``."""
    if options.get("base", "group") == "group" and options.get("num_groups") is None:
        options["num_groups"] = _num_groups(num_features, dims, {})
    return _call_checked("proxy", ProxyNorm, num_features, **options)


@register_norm("weightstd", weight_standardized_convs=True)
def _weightstd(num_features: int, *, dims: int, num_contexts: int, **options: object
               ) -> nn.Module:
    """Weight Standardization + GroupNorm (BiT): this is the GroupNorm side; models declare
    ``WSConv2d`` convolutions for this name (``conv2d_class``). Groups as ``group``."""
    options["num_groups"] = _num_groups(num_features, dims, options)
    return _call_checked("weightstd", WSGroupNorm, num_features, **options)
