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


# Options that choose where and how a run executes, never what it computes: they may differ
# between a run and its ``--resume`` (``rounds`` may grow too: it extends the run).
RUNTIME_OPTIONS = frozenset({
    "out", "resume", "overwrite", "verbose", "backend", "num_cpus", "cpus_per_client",
    "gpus_per_client", "cohort_size", "ray_address", "data_dir", "download", "plugin_path",
})


def experiment_options(config: SimConfig | dict[str, Any]) -> dict[str, Any]:
    """The options that decide a run's results (every option but :data:`RUNTIME_OPTIONS`)."""
    values = config if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in values.items() if k not in RUNTIME_OPTIONS}


# Options added after results folders were first named by the hash, with the value every run
# saved before they existed used: hashed only when set otherwise, so that such a run keeps its
# folder's name (and ``--resume`` without ``--out`` finds it), and read as that value when such a
# run is resumed (so that ``--resume --cohort-sums`` of it is refused, not ignored).
ADDED_OPTIONS = {"cohort_sums": False}


def config_hash(config: SimConfig) -> str:
    """8 hex digits of the options that decide the results, ``rounds`` aside (a run extended
    with ``--resume --rounds N`` stays the same experiment)."""
    import hashlib
    import json

    key = {k: v for k, v in experiment_options(config).items()
           if k != "rounds" and not (k in ADDED_OPTIONS and v == ADDED_OPTIONS[k])}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def default_out(config: SimConfig) -> str:
    """``results/<scenario>-<norm>-<policy>-<strategy>-seed<seed>-<hash>``: the hash
    (:func:`config_hash`) covers every other option that changes results, so two different
    experiments never share a name. ``python -m fedctx.simulate`` adds a counter
    (:func:`numbered_out`) so that a repeated experiment never lands in a used folder."""
    return (f"results/{config.scenario}-{config.norm}-{config.norm_policy}-"
            f"{config.strategy.replace(':', '.').replace('/', '.')}-seed{config.seed}-"
            f"{config_hash(config)}")


def numbered_out(config: SimConfig) -> str:
    """:func:`default_out`, then ``-2``, ``-3``, ...: the first that is free (absent or an empty
    folder) for a new run; for ``--resume``, the last one used (a new run's name if none)."""
    from pathlib import Path

    from fedctx.results import numbered

    used = []
    for name in numbered(default_out(config)):
        path = Path(name)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return used[-1] if config.resume and used else name
        used.append(name)
    return used[-1]
