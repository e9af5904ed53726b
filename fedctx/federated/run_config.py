"""Flower's ``context.run_config`` <-> fedctx's :class:`~fedctx.config.SimConfig`.

The run config is flat, with the options' flag names as keys (``norm-policy``, ``local-epochs``,
...): the ``[tool.flwr.app.config]`` table of ``pyproject.toml`` holds the default experiment,
``flwr run . --run-config "rounds=3"`` overrides it, and ``python -m fedctx.simulate`` passes
the options it resolved.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from fedctx.config import ConfigError, SimConfig

_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def to_run_config(config: SimConfig) -> dict[str, bool | int | float | str]:
    """The run config that describes ``config`` (every option)."""
    return {f.name.replace("_", "-"): getattr(config, f.name) for f in fields(SimConfig)}


def from_run_config(run_config: dict[str, Any]) -> SimConfig:
    """A validated :class:`SimConfig` from a run config; options it lacks take their defaults,
    an unknown key is a :class:`ConfigError`; an empty ``out`` becomes the default folder."""
    kinds = {f.name: _KINDS[f.type] for f in fields(SimConfig)}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in kinds:
            raise ConfigError(f"run config: unknown option {key!r}")
        kind = kinds[name]
        values[name] = float(value) if kind is float and isinstance(value, int) else value
        if not isinstance(values[name], kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"run config: {key} = {value!r} is not a {kind.__name__}")
    config = SimConfig(**values).validate()
    if not config.out:
        config.out = default_out(config)
    return config


def default_out(config: SimConfig) -> str:
    """``results/<scenario>-<norm>-<policy>-<strategy>-seed<seed>``."""
    return (f"results/{config.scenario}-{config.norm}-{config.norm_policy}-"
            f"{config.strategy.replace(':', '.')}-seed{config.seed}")
