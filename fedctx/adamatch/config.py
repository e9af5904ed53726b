"""Options of ``python -m fedctx.adapt``: defaults < ``--config`` TOML file < flags.

Defaults are the AdaMatch paper's domain-adaptation settings (Berthelot et al. 2021, Sec. 4 and
the authors' code) except where the model or the budget forces a change (see docs/adamatch.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedctx.adamatch.data import DOMAINS


class AdaptConfigError(ValueError):
    """An invalid option; the message names the flag, the value and what is valid."""


def _opt(default: Any, help: str, **checks: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class AdaptConfig:
    """One AdaMatch run. Every field is also a ``--flag`` (``_`` written ``-``)."""

    source: str = _opt("mnist", "labelled source domain (context 0)", choices=tuple(DOMAINS))
    target: str = _opt("mnistm", "unlabelled target domain (context 1)", choices=tuple(DOMAINS))
    norm: str = _opt("context", "normalization layer: batch (the paper's), context, acn, uan, "
                     "... (any name of fedctx.norm.available())", choices="norms")
    width: int = _opt(16, "width of the digits CNN (channels of the first conv)", ge=1)
    steps: int = _opt(2000, "training steps (the paper trains far longer; see docs)", ge=1)
    batch_size: int = _opt(64, "labelled source images per step (paper: 64)", ge=2)
    uratio: int = _opt(3, "target images per source image (paper: 3)", ge=1)
    lr: float = _opt(0.03, "base learning rate of SGD (paper: 0.03)", gt=0.0)
    lr_final_ratio: float = _opt(0.25, "lr(t) = lr * cos(arccos(r) * t / T): final lr ratio r",
                                 gt=0.0, le=1.0)
    momentum: float = _opt(0.9, "SGD (Nesterov) momentum (paper: 0.9)", ge=0.0, lt=1.0)
    weight_decay: float = _opt(1e-3, "weight decay of conv/linear weights (paper, DA: 1e-3)",
                               ge=0.0)
    tau: float = _opt(0.9, "relative confidence threshold ratio (paper: 0.9)", ge=0.0, le=1.0)
    ema: float = _opt(0.999, "decay of the EMA model used for evaluation (paper: 0.999)",
                      ge=0.0, lt=1.0)
    norm_momentum: float = _opt(0.001, "running-statistics momentum of the norm layers, PyTorch "
                                "convention (paper: 0.999 in JAX's = 0.001 here); 0 keeps "
                                "each layer's own default", ge=0.0, le=1.0)
    pad: int = _opt(2, "weak augmentation: random shift up to this many pixels", ge=0)
    train_samples: int = _opt(0, "use at most this many training images per domain (0: all)",
                              ge=0)
    eval_samples: int = _opt(0, "evaluate on at most this many test images per domain (0: all)",
                             ge=0)
    eval_every: int = _opt(100, "evaluate target accuracy every this many steps", ge=1)
    embed_samples: int = _opt(500, "test images per domain in the 2-D feature embedding", ge=10)
    seed: int = _opt(0, "random seed (model init, sampling, augmentation)", ge=0)
    data_dir: str = _opt("", "data root holding MNIST/, USPS/, mnist_m/, SVHN/, SynthDigits/ "
                         "(empty: $FEDCTX_DATA, else ../shared/data)")
    out: str = _opt("", "results folder (empty: results/adamatch/<source>-<target>-<norm>-"
                    "seed<seed>)")
    device: str = _opt("auto", "torch device", choices=("auto", "cpu", "cuda"))
    threads: int = _opt(0, "torch CPU threads (0: torch's default)", ge=0)

    def validate(self) -> AdaptConfig:
        """Check every field; raise :class:`AdaptConfigError` naming the flag and valid values."""
        from fedctx.norm import available

        for f in fields(self):
            value, meta, flag = getattr(self, f.name), f.metadata, _flag(f.name)
            choices = tuple(available()) if meta.get("choices") == "norms" else meta.get("choices")
            if choices is not None and value not in choices:
                raise AdaptConfigError(f"{flag}: invalid value {value!r}; valid choices: "
                                       f"{', '.join(choices)}")
            for key, word, ok in (("ge", ">=", value.__ge__), ("gt", ">", value.__gt__),
                                  ("le", "<=", value.__le__), ("lt", "<", value.__lt__)):
                if key in meta and not ok(meta[key]):
                    raise AdaptConfigError(f"{flag}: invalid value {value!r}; must be {word} "
                                           f"{meta[key]}")
        if self.source == self.target:
            raise AdaptConfigError(f"--source and --target are both {self.source!r}; choose "
                                   "two different domains")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise AdaptConfigError("--device: 'cuda' requested but no CUDA device is "
                                       "available; valid choices here: auto, cpu")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> AdaptConfig:
        return dataclasses.replace(self, **changes)


_TYPES = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, kind: type, value: Any) -> Any:
    try:
        if kind is int and (isinstance(value, float) or isinstance(value, bool)):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise AdaptConfigError(f"{_flag(name)}: invalid value {value!r}; expected "
                               f"{kind.__name__}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Top-level keys of a TOML file as option values (``-`` or ``_`` in names)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AdaptConfigError(f"--config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise AdaptConfigError(f"--config: {path} is not valid TOML: {err}") from None
    known = {f.name: _TYPES[f.type] for f in fields(AdaptConfig)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise AdaptConfigError(f"--config: unknown option {key!r} in {path}; valid options: "
                                   f"{', '.join(sorted(_flag(k)[2:] for k in known))}")
        values[name] = _coerce(name, known[name], value)
    return values


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`AdaptConfig` field (unset flags stay ``None``), plus
    ``--config``."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file of options (keys as the flags, without --); flags win")
    defaults = AdaptConfig()
    for f in fields(AdaptConfig):
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if isinstance(choices, tuple):
            help_text += f" (choices: {', '.join(choices)})"
        parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.type.upper(),
                            help=f"{help_text} [default: {getattr(defaults, f.name)!r}]")


def resolve(args: argparse.Namespace) -> AdaptConfig:
    """Merge defaults < ``--config`` file < flags, then validate."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    for f in fields(AdaptConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = _coerce(f.name, _TYPES[f.type], given)
    return AdaptConfig(**values).validate()
