"""Typed experiment configuration: defaults < scenario file < the norm's training defaults <
config file (TOML) < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

NORM_POLICIES = ("average", "local", "stats-local", "per-context")
PARTITIONS = ("iid", "dirichlet", "shards")
#: How the server evaluates a domain no client trained on (``--holdout-domain``), see
#: :mod:`fedctx.federated.unseen`.
UNSEEN_RULES = ("bank-mean", "batch-stats", "nearest")
CONTEXT_SOURCES = ("domain", "kmeans")
# built-in strategies whose aggregate is the num-examples-weighted mean (--cohort-sums)
SUMMABLE_STRATEGIES = ("fedavg", "fedprox", "fedbn", "silobn")


_BOUNDS = {"min": ">=", "ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {
    "min": lambda v, b: v >= b, "ge": lambda v, b: v >= b, "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b, "lt": lambda v, b: v < b,
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class ConfigError(ValueError):
    """Invalid configuration; the message names the option, the value and the valid choices."""


def option(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with its ``--flag`` help and checks: ``choices`` (a tuple, or a
    callable returning one) and bounds ``min``/``ge``/``gt``/``le``/``lt``."""
    return field(default=default, metadata={"help": help, **extra})


def norm_names() -> list[str]:
    """Valid ``--norm`` values (imported lazily: the norm registry is heavy)."""
    from fedctx.norm import available

    return available()


def scenario_names() -> list[str]:
    """Valid ``--scenario`` values. The scenarios (an upper layer: they build data with this
    module's :class:`SimConfig`) are imported only when a configuration is validated, never when
    this module is, so ``fedctx.config`` and ``fedctx.scenarios`` do not import each other."""
    from fedctx.scenarios import available

    return available()


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(obj: Any, error: type[ConfigError] = ConfigError) -> None:
    """Check every field of the options dataclass ``obj`` against its choices and bounds; a
    float must be finite (``inf`` and ``nan`` pass or fail bounds by accident)."""
    for f in fields(obj):
        _check_value(f, getattr(obj, f.name), error, registries=True)


def check_flags(cls: type, args: argparse.Namespace, error: type[ConfigError] = ConfigError
                ) -> None:
    """Check each option given as a flag in ``args`` on its own: its type, bounds and fixed
    choices, but no choice that a registry holds (``--norm``, ``--scenario``: importing them
    imports torch). What a flag alone can tell, in milliseconds, before anything is started;
    :func:`resolve_options` checks everything again, with the registries."""
    for f in fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            _check_value(f, _coerce(f.name, _TYPES[f.type], given, error), error,
                         registries=False)


def _check_value(f: dataclasses.Field, value: Any, error: type[ConfigError], *,
                 registries: bool) -> None:
    import math

    meta, flag = f.metadata, flag_of(f.name)
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{flag}: invalid value {value!r}; must be a finite number")
    choices = meta.get("choices")
    if callable(choices):
        choices = tuple(choices()) if registries else None
    if choices is not None and value not in choices:
        raise error(f"{flag}: invalid value {value!r}; valid choices: {', '.join(choices)}")
    for key, words in _BOUNDS.items():
        if key in meta and not _BOUND_OK[key](value, meta[key]):
            raise error(f"{flag}: invalid value {value!r}; must be {words} {meta[key]}")


def _coerce(name: str, kind: type, value: Any, error: type[ConfigError] = ConfigError) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float | bool):
            raise ValueError(value)
        if kind is str and not isinstance(value, str):  # a TOML number, array or table
            raise ValueError(value)
        out = kind(value)
    except (TypeError, ValueError):
        raise error(f"{flag_of(name)}: invalid value {value!r}; expected {kind.__name__}"
                    ) from None
    if kind is float and out - out != 0:  # inf, -inf, nan (also "1e999")
        raise error(f"{flag_of(name)}: invalid value {value!r}; must be a finite number")
    return out


def load_options_file(cls: type, path: Path, error: type[ConfigError] = ConfigError
                      ) -> dict[str, Any]:
    """Read a TOML file whose top-level keys are ``cls``'s option names (``-`` or ``_``).

    One-line ``error`` for a path that is missing, a directory or not a regular file (a FIFO or
    device could block the read), unreadable, not UTF-8, not TOML, or that sets no option.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise error(f"--config: {path} is a directory, not a TOML file")
        if path.exists() and not path.is_file():
            raise error(f"--config: {path} is not a regular file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"--config: file not found: {path}") from None
    except OSError as err:
        raise error(f"--config: cannot read {path}: {err.strerror or err}") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"--config: {path} is not UTF-8 text (byte {err.start} is "
                    f"{data[err.start]:#04x})") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"--config: {path} is not valid TOML: {' '.join(str(err).split())}"
                    ) from None
    if not raw:
        raise error(f"--config: {path} is empty (it sets no option)")
    known = {f.name: _TYPES[f.type] for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise error(f"--config: unknown option {key!r} in {path}; valid options: "
                        f"{', '.join(sorted(flag_of(k)[2:] for k in known))}")
        out[name] = _coerce(name, known[name], value, error)
    return out


class OneLineParser(argparse.ArgumentParser):
    """Reports bad arguments in one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_option_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--config`` plus one ``--flag`` per field of ``cls`` (unset flags stay ``None``)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (keys as the flags, without --); flags win")
    defaults = cls()
    for f in fields(cls):
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if isinstance(choices, tuple):
            help_text += f" (choices: {', '.join(choices)})"
        default = getattr(defaults, f.name)
        if f.type == "bool":
            parser.add_argument(flag_of(f.name), dest=f.name, action="store_true", default=None,
                                help=f"{help_text} [default: {default}]")
        else:
            parser.add_argument(flag_of(f.name), dest=f.name, type=str, default=None,
                                metavar=f.type.upper(), help=f"{help_text} [default: {default!r}]")


def resolve_options(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None,
                    error: type[ConfigError] = ConfigError) -> Any:
    """Merge defaults < ``base`` < ``--config`` file < flags into a validated ``cls``."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_options_file(cls, args.config, error))
    for f in fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = _coerce(f.name, _TYPES[f.type], given, error)
    return cls(**values).validate()


@dataclass
class SimConfig:
    """Every option of ``python -m fedctx.simulate``; each is also a ``--flag``."""

    scenario: str = option("digits", "named scenario (data, contexts, model), see fedctx.scenarios",
                         choices=scenario_names)
    clients: int = option(20, "number of simulated clients (Flower SuperNodes)", min=1)
    rounds: int = option(8, "federated rounds", min=1)
    fraction: float = option(0.5, "share of clients sampled for training each round", gt=0.0,
                           le=1.0)
    min_clients: int = option(2, "least number of clients a round needs", min=1)
    local_epochs: int = option(1, "local epochs per round", min=1)
    batch_size: int = option(32, "local mini-batch size", min=2)
    lr: float = option(0.05, "client learning rate (SGD)", gt=0.0)
    momentum: float = option(0.9, "client SGD momentum", ge=0.0, lt=1.0)
    weight_decay: float = option(0.0, "client weight decay", ge=0.0)
    norm: str = option("context", "normalization layer (any of fedctx.norm.available())",
                     choices=norm_names)
    norm_options: str = option("", "options of every normalization layer, KEY=VALUE[,KEY=VALUE] "
                               "(e.g. min_batch_values=2 for context; see docs/norms.md)")
    norm_policy: str = option("per-context", "what the server does with normalization tensors",
                            choices=NORM_POLICIES)
    strategy: str = option("fedavg", "aggregation strategy for the shared weights "
                         "(a registered name or module:Class)")
    model: str = option("", "model name (empty: the scenario's default)")
    width: int = option(16, "model width (channels of the first conv)", min=1)
    eval_every: int = option(1, "evaluate the global model every this many rounds (and after "
                           "the last)", min=1)
    # < 2**32: numpy's legacy seed range; it keeps the derived torch seeds (seed * 1_000_003 +
    # round * 10_007 + client < 2**64) and Flower's signed 64-bit run config in range.
    seed: int = option(0, "random seed (0 to 4294967295): same seed, same sampling and metrics",
                       min=0, lt=2**32)
    out: str = option("", "results folder (empty: results/<scenario>-<norm>-<policy>-<strategy>-"
                                "seed<seed>-<hash>)")
    data_dir: str = option("", "folder holding real data sets (torchvision layout); empty: the "
                         "scenario's default / embedded data")
    download: bool = option(False, "allow torchvision to download missing data sets")
    allow_missing_domains: bool = option(False, "run a scenario with the domains whose data are on "
                                       "disk when others are missing (recorded in results)")
    round_timeout: float = option(600.0, "seconds a round waits for client replies; a client "
                                  "that has not replied by then counts as failed", gt=0.0)
    max_examples: int = option(0, "largest num-examples a client's reply may claim (0: the "
                               "number of training images the client registered with)", min=0)
    domain_alpha: float = option(0.0, "each client's mix of domains drawn from Dirichlet(A) "
                                 "(0: one domain per client)", ge=0.0)
    partition: str = option("iid", "label skew within a domain: iid, dirichlet (Dirichlet(--alpha) "
                            "shares per class) or shards (2 label-sorted shards per client)",
                            choices=PARTITIONS)
    alpha: float = option(0.5, "Dirichlet concentration of --partition dirichlet", gt=0.0)
    holdout_domain: str = option("", "a domain held out of training, evaluated by the server "
                                 "with every --unseen-rule (empty: none)")
    unseen_rule: str = option("bank-mean", "rule whose held-out accuracy is the headline one "
                              "(every rule is recorded)", choices=UNSEEN_RULES)
    unlabelled_domains: str = option("", "comma-separated domains whose clients hold images "
                                     "without labels (empty: none)")
    contexts: str = option("domain", "what a sample's context is: its domain, or its k-means "
                           "cluster (--num-contexts of them)", choices=CONTEXT_SOURCES)
    num_contexts: int = option(0, "number of k-means contexts (--contexts kmeans; 0: as many as "
                               "the scenario's training domains)", min=0)
    cpus_per_client: float = option(1.0, "CPUs Ray reserves per simulated client", gt=0.0)
    cohort_size: int = option(0, "clients carried by one Flower message in a simulation (0: one "
                              "message per Ray worker each round; 1: one message per client)",
                              min=0)
    cohort_sums: bool = option(False, "each cohort answers with its clients' example-weighted sums "
                               "instead of one reply per client (strategies that average: "
                               "fedavg, fedprox, fedbn, silobn; the model equals the per-client "
                               "replies' to float tolerance)")
    gpus_per_client: float = option(0.0, "GPU fraction Ray reserves per client (0: CPU only)",
                                  ge=0.0, le=1.0)
    num_cpus: int = option(0, "CPUs given to the local Ray instance (0: all of this machine)",
                         min=0)
    backend: str = option("ray", "where clients run: 'ray' (Flower's simulation engine) or "
                        "'inprocess' (one process, no Ray; same results)",
                        choices=("ray", "inprocess"))
    ray_address: str = option("", "join an existing Ray cluster at this address instead of "
                            "starting a local one")
    resume: bool = option(False, "continue the run in --out from its last finished round")
    overwrite: bool = option(False, "replace the results of another run in an existing --out "
                             "(only the files fedctx writes are removed)")
    plugin_path: str = option("", "folders (os.pathsep-separated) a module:Class --strategy "
                              "may be imported from; empty: installed modules only")
    verbose: bool = option(False, "show Flower's and Ray's own logs")

    def validate(self) -> SimConfig:
        """Check ranges and choices; raise :class:`ConfigError` naming the problem and the fix."""
        check_fields(self)
        if self.min_clients > self.clients:
            raise ConfigError(f"--min-clients {self.min_clients} exceeds --clients {self.clients}")
        if self.cohort_sums and self.strategy not in SUMMABLE_STRATEGIES:
            raise ConfigError(f"--cohort-sums needs a strategy that averages "
                              f"({', '.join(SUMMABLE_STRATEGIES)}), not {self.strategy!r}")
        if self.cohort_sums and self.cohort_size == 1:
            raise ConfigError("--cohort-sums needs cohorts: --cohort-size 0 (one per Ray worker) "
                              "or above 1")
        unlabelled = self.unlabelled_list()
        if len(set(unlabelled)) != len(unlabelled) or "" in unlabelled:
            raise ConfigError(f"--unlabelled-domains: invalid value {self.unlabelled_domains!r}; "
                              "expected distinct domain names separated by commas")
        if self.holdout_domain and self.holdout_domain in unlabelled:
            raise ConfigError(f"--holdout-domain {self.holdout_domain} is also in "
                              f"--unlabelled-domains; a held-out domain has no clients")
        if unlabelled and self.domain_alpha > 0:
            raise ConfigError(f"--unlabelled-domains needs one domain per client; drop "
                              f"--domain-alpha {self.domain_alpha}")
        if self.partition == "shards" and self.domain_alpha > 0:
            raise ConfigError(f"--partition shards deals label shards to one-domain clients; "
                              f"with --domain-alpha {self.domain_alpha} use --partition iid or "
                              "dirichlet")
        check_norm_options(self.norm, self.norm_options)
        if self.num_contexts and self.contexts != "kmeans":
            raise ConfigError(f"--num-contexts {self.num_contexts} applies to --contexts kmeans "
                              f"only (--contexts is {self.contexts!r})")
        return self

    def unlabelled_list(self) -> list[str]:
        """``--unlabelled-domains`` as a list of names (empty when none)."""
        return self.unlabelled_domains.split(",") if self.unlabelled_domains else []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Norm-layer arguments the model sets itself (``--norm-options`` may not).
MODEL_SET_NORM_OPTIONS = ("num_features", "num_contexts", "dims", "activation", "device", "dtype")


def parse_norm_options(text: str) -> dict[str, bool | int | float | str]:
    """``--norm-options`` as keyword arguments: ``"min_batch_values=2,eps=1e-3,affine=false"``
    -> ``{"min_batch_values": 2, "eps": 0.001, "affine": False}`` (ints, floats, true/false,
    else strings)."""
    options: dict[str, bool | int | float | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier() or not value:
            raise ConfigError(f"--norm-options: invalid item {item!r}; expected KEY=VALUE "
                              "items separated by commas, e.g. min_batch_values=2")
        if key in options:
            raise ConfigError(f"--norm-options: {key} is given twice")
        if key in MODEL_SET_NORM_OPTIONS:
            raise ConfigError(f"--norm-options: {key} is set by the model, not an option "
                              f"(options set by the model: {', '.join(MODEL_SET_NORM_OPTIONS)})")
        options[key] = _option_value(value)
    return options


def _option_value(value: str) -> bool | int | float | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def check_norm_options(norm: str, text: str) -> None:
    """Raise :class:`ConfigError` (one line) unless every ``--norm-options`` item is an option
    ``norm``'s layers accept (built once where an activation follows, once where none does)."""
    options = parse_norm_options(text)
    if not options:
        return
    from fedctx.norm import make_norm_act

    try:
        for activation in ("relu", None):
            make_norm_act(norm, 4, activation, num_contexts=2, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--norm-options {text!r}: not valid for --norm {norm}: {err}") from None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file of :class:`SimConfig` options."""
    return load_options_file(SimConfig, path)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A one-line-error parser with ``--config`` and one flag per :class:`SimConfig` field."""
    parser = OneLineParser(prog=prog, description=description)
    add_option_arguments(parser, SimConfig)
    return parser


def norm_defaults(norm: str) -> dict[str, Any]:
    """The training options the norm registry recommends for ``norm`` (``SimConfig`` names;
    empty for an unknown name, which validation then reports)."""
    from fedctx.norm import available, train_defaults

    if norm not in available():
        return {}
    values = train_defaults(norm)
    known = {f.name for f in fields(SimConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"norm {norm!r} declares training defaults for unknown options "
                          f"{unknown}; valid options: {', '.join(sorted(known))}")
    return values


def resolve(args: argparse.Namespace, base: dict[str, Any] | None = None) -> SimConfig:
    """Merge defaults < ``base`` (e.g. a scenario's config file) < the norm's training defaults
    < --config file < flags.

    The norm's training defaults (``fedctx.norm.train_defaults``, e.g. a smaller ``lr`` for a
    norm without batch statistics) are those of the norm the run ends up with (flag, config
    file, ``base`` or default, in that order of precedence); they replace the built-in and
    scenario defaults but never a value given in a ``--config`` file or a flag, and they are
    part of the resolved configuration (``config.json``).
    """
    base = dict(base or {})
    file_values = (load_options_file(SimConfig, args.config)
                   if getattr(args, "config", None) else {})
    norm = (getattr(args, "norm", None) or file_values.get("norm") or base.get("norm")
            or SimConfig.norm)
    return resolve_options(SimConfig, args, {**base, **norm_defaults(str(norm))})
