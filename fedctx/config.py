"""Typed experiment configuration: defaults < config file (TOML) < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

NORM_POLICIES = ("average", "local", "stats-local", "per-context")


_BOUNDS = {"min": ">=", "ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {
    "min": lambda v, b: v >= b, "ge": lambda v, b: v >= b, "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b, "lt": lambda v, b: v < b,
}


class ConfigError(ValueError):
    """Invalid configuration; the message names the option, the value and the valid choices."""


def _opt(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class SimConfig:
    """Every option of ``python -m fedctx.simulate``; each is also a ``--flag``."""

    scenario: str = _opt("digits", "named scenario (data + contexts + model), see simulations/")
    clients: int = _opt(20, "number of simulated clients (Flower SuperNodes)", min=1)
    rounds: int = _opt(8, "federated rounds", min=1)
    fraction: float = _opt(0.5, "share of clients sampled for training each round", gt=0.0,
                           le=1.0)
    min_clients: int = _opt(2, "least number of clients a round needs", min=1)
    local_epochs: int = _opt(1, "local epochs per round", min=1)
    batch_size: int = _opt(32, "local mini-batch size", min=2)
    lr: float = _opt(0.05, "client learning rate (SGD)", gt=0.0)
    momentum: float = _opt(0.9, "client SGD momentum", ge=0.0, lt=1.0)
    weight_decay: float = _opt(0.0, "client weight decay", ge=0.0)
    norm: str = _opt("context", "normalization layer (see fedctx.norm.available())")
    norm_policy: str = _opt("per-context", "what the server does with normalization tensors",
                            choices=NORM_POLICIES)
    strategy: str = _opt("fedavg", "aggregation strategy for the shared weights "
                         "(a registered name or module:Class)")
    model: str = _opt("", "model name (empty: the scenario's default)")
    width: int = _opt(16, "model width (channels of the first conv)", min=1)
    seed: int = _opt(0, "random seed: same seed, same sampling and metrics", min=0)
    out: str = _opt("", "results folder (empty: results/<scenario>-<norm>-<policy>-seed<seed>)")
    data_dir: str = _opt("", "folder holding real data sets (torchvision layout); empty: the "
                         "scenario's default / embedded data")
    download: bool = _opt(False, "allow torchvision to download missing data sets")
    allow_missing_domains: bool = _opt(False, "run a scenario with the domains whose data are on "
                                       "disk when others are missing (recorded in results)")
    cpus_per_client: float = _opt(1.0, "CPUs Ray reserves per simulated client", gt=0.0)
    gpus_per_client: float = _opt(0.0, "GPU fraction Ray reserves per client (0: CPU only)",
                                  ge=0.0, le=1.0)
    num_cpus: int = _opt(0, "CPUs given to the local Ray instance (0: all of this machine)",
                         min=0)
    backend: str = _opt("ray", "where clients run: 'ray' (Flower's simulation engine) or "
                        "'inprocess' (one process, no Ray; same results)",
                        choices=("ray", "inprocess"))
    ray_address: str = _opt("", "join an existing Ray cluster at this address instead of "
                            "starting a local one")
    resume: bool = _opt(False, "continue the run in --out from its last finished round")
    verbose: bool = _opt(False, "show Flower's and Ray's own logs")

    def validate(self) -> SimConfig:
        """Check ranges and choices; raise :class:`ConfigError` naming the problem and the fix."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = "--" + f.name.replace("_", "-")
            if "choices" in meta and value not in meta["choices"]:
                raise ConfigError(f"{flag}: invalid value {value!r}; valid choices: "
                                  f"{', '.join(meta['choices'])}")
            for key, words in _BOUNDS.items():
                if key in meta and not _BOUND_OK[key](value, meta[key]):
                    raise ConfigError(f"{flag}: invalid value {value!r}; must be {words} "
                                      f"{meta[key]}")
        if self.min_clients > self.clients:
            raise ConfigError(f"--min-clients {self.min_clients} exceeds --clients {self.clients}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, kind: type, value: Any) -> Any:
    flag = "--" + name.replace("_", "-")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: invalid value {value!r}; expected {kind.__name__}") from None


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file: top-level keys are option names (``-`` or ``_``)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML: {err}") from None
    known = {f.name: _TYPES[f.type] for f in fields(SimConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config: unknown option {key!r} in {path}; valid options: "
                              f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
        out[name] = _coerce(name, known[name], value)
    return out


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`SimConfig` field (defaults left unset)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file; flags given on the command line win over it")
    defaults = SimConfig()
    for f in fields(SimConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if "choices" in f.metadata:
            help_text += f" ({', '.join(f.metadata['choices'])})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", default=None,
                                help=f"{help_text} (default: {getattr(defaults, f.name)})")
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, metavar=f.type.upper(),
                                help=f"{help_text} (default: {getattr(defaults, f.name)!r})")
    return parser


def resolve(args: argparse.Namespace, base: dict[str, Any] | None = None) -> SimConfig:
    """Merge defaults < ``base`` (e.g. a scenario's config file) < --config file < flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    types = {f.name: _TYPES[f.type] for f in fields(SimConfig)}
    for name, kind in types.items():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _coerce(name, kind, given)
    return SimConfig(**values).validate()
