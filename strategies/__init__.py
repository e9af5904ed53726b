"""Aggregation strategies for the shared (non-normalization) weights, found by name.

A strategy is any Flower Message-API strategy (``flwr.serverapp.strategy.Strategy``). fedctx
wraps it in :class:`fedctx.federated.norm_strategy.NormPolicyStrategy`: the strategy samples the
nodes (seeded by the wrapper) and aggregates the shared weights, the run's norm policy handles
the normalization tensors. Names resolve, in order, to:

1. the built-ins below (Flower's own classes with fedctx defaults);
2. plugins registered in the entry-point group ``fedctx.strategies`` (``name = "pkg.mod:obj"``);
3. ``module:Class``: a module that is installed, or one under a folder of ``--plugin-path``;
   never one that merely sits in the current directory (a config file is data: naming a
   strategy in it must not run whatever ``.py`` file the working directory holds).

A plugin object is a ``Strategy`` subclass (built with the keyword arguments of
:func:`strategy_kwargs`) or a factory ``(config: SimConfig) -> Strategy``. A plugin may set a class
attribute ``norm_policy`` (e.g. ``"local"``) that is used when the user gives none. See
``docs/strategies.md``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp import strategy as fl

from fedctx.config import SimConfig

ENTRY_POINT_GROUP = "fedctx.strategies"


def strategy_kwargs(config: SimConfig) -> dict[str, Any]:
    """Keyword arguments every Flower strategy gets: it samples ``--fraction`` of the
    ``--clients`` nodes (at least ``--min-clients``) once all have connected. Federated
    evaluation asks every node (the norm policy keeps those that trained) when the clients hold
    their own normalization (``local``, ``stats-local``); otherwise the server evaluates."""
    client_side = config.norm_policy in ("local", "stats-local")
    return {"fraction_train": config.fraction, "min_train_nodes": config.min_clients,
            "min_available_nodes": config.clients,
            "fraction_evaluate": 1.0 if client_side else 0.0, "min_evaluate_nodes": 0}


def _builtin(cls: type[fl.Strategy], norm_policy: str | None = None, **defaults: Any):
    def factory(config: SimConfig) -> fl.Strategy:
        return cls(**strategy_kwargs(config), **defaults)

    factory.norm_policy = norm_policy  # type: ignore[attr-defined]
    factory.__doc__ = f"Flower's {cls.__name__} with {defaults or 'its defaults'}"
    return factory


BUILTIN: dict[str, Callable[[SimConfig], fl.Strategy]] = {
    "fedavg": _builtin(fl.FedAvg),
    "fedprox": _builtin(fl.FedProx, proximal_mu=0.01),
    "fedadam": _builtin(fl.FedAdam, eta=0.01, eta_l=0.05, tau=1e-3),
    "fedyogi": _builtin(fl.FedYogi, eta=0.01, eta_l=0.05, tau=1e-3),
    "fedadagrad": _builtin(fl.FedAdagrad, eta=0.01, eta_l=0.05, tau=1e-3),
    "fedavgm": _builtin(fl.FedAvgM, server_learning_rate=1.0, server_momentum=0.9),
    "fedmedian": _builtin(fl.FedMedian),
    "fedtrimmedavg": _builtin(fl.FedTrimmedAvg, beta=0.2),
    "krum": _builtin(fl.Krum, num_malicious_nodes=0),
    "fedbn": _builtin(fl.FedAvg, norm_policy="local"),
    "silobn": _builtin(fl.FedAvg, norm_policy="stats-local"),
}


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Built-in and installed plugin strategy names."""
    return sorted(set(BUILTIN) | set(_plugins()))


def _import_path(plugin_path: str) -> list[str]:
    """``sys.path`` for importing a ``module:Class`` strategy: the ``plugin_path`` folders, then
    ``sys.path`` without the entry Python adds for the current directory (``''`` or its path,
    before any other; the same folder named again later, e.g. in ``PYTHONPATH``, stays)."""
    cwd = os.getcwd()
    path = list(sys.path)
    for i, entry in enumerate(path):
        if entry in ("", ".") or os.path.abspath(entry) == cwd:
            del path[i]
            break
    extra = [os.path.abspath(p) for p in plugin_path.split(os.pathsep) if p]
    return extra + path


def _load_object(spec: str, plugin_path: str = "") -> Any:
    module_name, _, attr = spec.partition(":")
    saved = sys.path[:]
    sys.path[:] = _import_path(plugin_path)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ModuleNotFoundError as err:
        where = f"under --plugin-path {plugin_path}" if plugin_path else "installed"
        raise ValueError(f"cannot load strategy {spec!r}: {err} ({where}; a module in the "
                         "current directory needs --plugin-path .)") from None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load strategy {spec!r}: {err}") from None
    finally:
        sys.path[:] = saved
    return obj


def plugin_source(name: str, plugin_path: str = "") -> str | None:
    """The file (or package folder) of a plugin strategy's code; ``None`` for a built-in."""
    if name.lower() in BUILTIN:
        return None
    obj = resolve_strategy(name, plugin_path=plugin_path)
    obj = getattr(obj, "plugin_class", obj)
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    if module is None or not getattr(module, "__file__", None):
        return None
    file = os.path.abspath(module.__file__)
    return os.path.dirname(file) if hasattr(module, "__path__") else file


def resolve_strategy(name: str, plugin_path: str = "") -> Callable[[SimConfig], fl.Strategy]:
    """A factory ``(config) -> Strategy`` for ``name``; ``ValueError`` naming valid choices.
    ``plugin_path``: folders a ``module:Class`` name may be imported from (``--plugin-path``)."""
    lowered = name.lower()
    if lowered in BUILTIN:
        return BUILTIN[lowered]
    plugins = _plugins()
    if name in plugins:
        obj = plugins[name].load()
    elif ":" in name:
        obj = _load_object(name, plugin_path)
    else:
        raise ValueError(f"unknown strategy {name!r}; valid choices: {', '.join(available())} "
                         "(or module:Class)")
    if inspect.isclass(obj) and issubclass(obj, fl.Strategy):
        cls = obj

        def factory(config: SimConfig) -> fl.Strategy:
            accepted = inspect.signature(cls).parameters
            kwargs = {k: v for k, v in strategy_kwargs(config).items() if k in accepted}
            return cls(**kwargs)

        factory.norm_policy = getattr(cls, "norm_policy", None)  # type: ignore[attr-defined]
        factory.plugin_class = cls  # type: ignore[attr-defined]
        return factory
    if callable(obj):
        return obj
    raise ValueError(f"strategy {name!r} is neither a Strategy subclass nor a factory")


def implied_norm_policy(name: str, plugin_path: str = "") -> str | None:
    """The norm policy a strategy name implies (``fedbn`` -> ``local``), if any."""
    return getattr(resolve_strategy(name, plugin_path), "norm_policy", None)
