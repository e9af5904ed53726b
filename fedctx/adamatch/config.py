"""Options of ``python -m fedctx.adapt``: defaults < ``--config`` TOML file < flags.

Defaults are the AdaMatch paper's domain-adaptation settings (Berthelot et al. 2021, Sec. 4 and
the authors' code) except where the model or the budget forces a change (see docs/adamatch.md).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from fedctx.config import (
    ConfigError,
    add_option_arguments,
    check_fields,
    check_norm_options,
    norm_names,
    option,
    resolve_options,
)

#: The digit domains (``fedctx.adamatch.data.DOMAINS`` holds their readers; named here so that
#: the options are checked without importing torch).
DOMAIN_NAMES = ("mnist", "usps", "mnistm", "svhn", "synthdigits")


class AdaptConfigError(ConfigError):
    """An invalid option; the message names the flag, the value and what is valid."""


@dataclass
class AdaptConfig:
    """One AdaMatch run. Every field is also a ``--flag`` (``_`` written ``-``)."""

    source: str = option("mnist", "labelled source domain (context 0)", choices=DOMAIN_NAMES)
    target: str = option("mnistm", "unlabelled target domain (context 1)", choices=DOMAIN_NAMES)
    norm: str = option("context", "normalization layer: batch (the paper's), context, acn, uan, "
                     "... (any name of fedctx.norm.available())", choices=norm_names)
    norm_options: str = option("", "options of every --norm layer, KEY=VALUE[,KEY=VALUE] (e.g. "
                               "min_batch_values=2 for context; see docs/norms.md)")
    width: int = option(16, "width of the digits CNN (channels of the first conv)", ge=1)
    steps: int = option(2000, "training steps (the paper trains far longer; see docs)", ge=1)
    batch_size: int = option(64, "labelled source images per step (paper: 64)", ge=2)
    uratio: int = option(3, "target images per source image (paper: 3)", ge=1)
    lr: float = option(0.03, "base learning rate of SGD (paper: 0.03)", gt=0.0)
    lr_final_ratio: float = option(0.25, "lr(t) = lr * cos(arccos(r) * t / T): final lr ratio r",
                                 gt=0.0, le=1.0)
    momentum: float = option(0.9, "SGD momentum (paper: 0.9)", ge=0.0, lt=1.0)
    nesterov: bool = option(False, "Nesterov momentum (FixMatch's TF code) instead of the plain "
                            "momentum of the AdaMatch authors' objax code")
    weight_decay: float = option(1e-3, "weight decay of conv/linear weights (paper, DA: 1e-3)",
                               ge=0.0)
    tau: float = option(0.9, "relative confidence threshold ratio (paper: 0.9)", ge=0.0, le=1.0)
    ema: float = option(0.999, "decay of the EMA model used for evaluation (paper: 0.999)",
                      ge=0.0, lt=1.0)
    ema_warmup: str = option("num-updates", "EMA warm-up: num-updates = decay min(ema, (1 + t) / "
                           "(10 + t)) at update t (TensorFlow's ExponentialMovingAverage "
                           "num_updates), so short runs report a trained model; none = constant "
                           "decay from the initial weights", choices=("num-updates", "none"))
    norm_momentum: float = option(0.001, "running-statistics momentum of the norm layers, PyTorch "
                                "convention (paper: 0.999 in JAX's = 0.001 here); 0 keeps "
                                "each layer's own default", ge=0.0, le=1.0)
    pad: int = option(3, "weak augmentation: random shift up to this many pixels (authors: "
                    "image size >> 3, i.e. 4 on 32x32 and 3 on these 28x28 images)", ge=0)
    norm_scope: str = option("all", "where --norm is used: all = every norm layer of the CNN; "
                           "input = one --norm layer over the 3 input channels before the first "
                           "conv, BatchNorm everywhere else (the SBN/CN, ACN and UAN papers' "
                           "protocol)", choices=("all", "input"))
    target_eval_context: str = option("target", "context of the target test images: target "
                                    "(context 1) or source (context 0, the normalization "
                                    "papers' Keras protocol)", choices=("target", "source"))
    train_samples: int = option(0, "use at most this many training images per domain (0: all)",
                              ge=0)
    eval_samples: int = option(0, "evaluate on at most this many test images per domain (0: all)",
                             ge=0)
    eval_every: int = option(100, "evaluate target accuracy every this many steps", ge=1)
    embed_samples: int = option(500, "test images per domain in the 2-D feature embedding", ge=10)
    seed: int = option(0, "random seed (model init, sampling, augmentation)", ge=0)
    data_dir: str = option("", "data root holding MNIST/, USPS/, mnist_m/, SVHN/, SynthDigits/ "
                         "(empty: $FEDCTX_DATA, else ./data)")
    download: bool = option(False, "let torchvision download missing MNIST/USPS/SVHN (needs "
                            "internet)")
    out: str = option("", "results folder (empty: results/adamatch/<source>-<target>-<norm>-"
                    "seed<seed>, -2, -3, ... when it holds a run)")
    device: str = option("auto", "torch device", choices=("auto", "cpu", "cuda"))
    threads: int = option(0, "torch CPU threads (0: torch's default, one per physical core)",
                        ge=0)
    memory_format: str = option("auto", "layout of images and conv activations: channels-last "
                              "(PyTorch's NHWC, 1.5x faster per step on this project's CPU), "
                              "contiguous (NCHW), or auto = channels-last on CPU, contiguous on "
                              "CUDA", choices=("auto", "channels-last", "contiguous"))
    malloc: str = option("reuse", "reuse: glibc's malloc keeps the memory a step frees for the "
                         "next step instead of handing each large tensor's pages back to the OS "
                         "(faster CPU steps, results bit for bit the same, the process keeps up "
                         "to 1 GiB it freed); default: the C library's own settings",
                         choices=("reuse", "default"))
    progress_every: float = option(30.0, "print a progress line (step, loss, step/s, ETA) at "
                                 "most every this many seconds between evaluations (0: never)",
                                 ge=0.0)

    def validate(self) -> AdaptConfig:
        """Check every field; raise :class:`AdaptConfigError` naming the flag and valid values."""
        check_fields(self, AdaptConfigError)
        try:
            check_norm_options(self.norm, self.norm_options)
        except ConfigError as err:
            raise AdaptConfigError(str(err)) from None
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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one ``--flag`` per :class:`AdaptConfig` field."""
    add_option_arguments(parser, AdaptConfig)


def resolve(args: argparse.Namespace, base: dict[str, Any] | None = None) -> AdaptConfig:
    """Merge defaults < ``base`` (a resumed run's saved options) < ``--config`` file < flags,
    then validate."""
    return resolve_options(AdaptConfig, args, base=base, error=AdaptConfigError)
