"""Named scenarios (``fedctx.scenarios``, the repository's ``simulations/`` folder): a recipe of
data + domains (contexts) + partition + default model.

A scenario is a :class:`Scenario` registered here; its default options live in the package data
``fedctx.configs`` (the repository's ``configs/<name>.toml``), used as the base that ``--config``
and flags override. ``python -m fedctx.scenarios show <scenario>`` draws a scenario's data.
"""

from __future__ import annotations

import importlib
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any

from fedctx.config import ConfigError, SimConfig
from fedctx.data import FederatedDataset

#: Models (``fedctx.models.MODELS``) that run on 28x28 and on 32x32 images: the digits CNN's
#: classifier is sized for 28x28, the ViT's position embedding for 32x32, the CIFAR ResNets pool
#: globally and take either.
MODELS_28 = ("digits-cnn", "resnet20", "resnet32", "resnet18")
MODELS_32 = ("resnet20", "resnet32", "resnet18", "vit-tiny")


@dataclass(frozen=True)
class Scenario:
    """``build(config) -> FederatedDataset`` plus the model used by default, the models that fit
    its images (``models``) and the shape of one image (``input_shape``)."""

    name: str
    description: str
    build: Callable[[SimConfig], FederatedDataset]
    model: str = "digits-cnn"
    models: tuple[str, ...] = MODELS_28
    input_shape: tuple[int, ...] = (3, 28, 28)

    def check_model(self, name: str) -> str:
        """The model a run uses: ``name``, or the default when empty.

        Raises:
            ConfigError: (a ``ValueError``) one line naming the models that fit this scenario,
                when ``name`` is unknown or built for other images.
        """
        from fedctx.models import MODELS

        if not name:
            return self.model
        if name in self.models:
            return name
        size = "x".join(str(n) for n in self.input_shape[1:])
        why = (f"unknown model {name!r}" if name not in MODELS else
               f"model {name!r} does not fit scenario {self.name!r} ({size} images)")
        raise ConfigError(f"--model: {why}; compatible models for {self.name!r}: "
                          f"{', '.join(self.models)}")

    def defaults(self) -> dict[str, Any]:
        """Options from ``fedctx.configs``' ``<name>.toml`` if that file exists (else none)."""
        from fedctx.config import load_config_file

        resource = config_file(self.name)
        if not resource.is_file():
            return {}
        with importlib.resources.as_file(resource) as path:
            return load_config_file(path)


def config_file(name: str) -> Traversable:
    """The default-options file of scenario ``name`` (package data of ``fedctx.configs``, the
    repository's ``configs/`` folder); it may not exist."""
    return importlib.resources.files("fedctx.configs") / f"{name}.toml"


_MODULES = {
    "digits": "fedctx.scenarios.digits",
    "digits5": "fedctx.scenarios.digits5",
    "mnist-usps": "fedctx.scenarios.adaptation_pairs:MNIST_USPS",
    "mnist-mnistm": "fedctx.scenarios.adaptation_pairs:MNIST_MNISTM",
    "mnist-svhn": "fedctx.scenarios.adaptation_pairs:MNIST_SVHN",
    "cifar10-dirichlet": "fedctx.scenarios.cifar10_dirichlet",
}


def available() -> list[str]:
    return sorted(_MODULES)


def get_scenario(name: str) -> Scenario:
    """The scenario ``name``; ``ValueError`` naming the valid choices if unknown."""
    if name not in _MODULES:
        raise ValueError(f"unknown scenario {name!r}; valid choices: {', '.join(available())}")
    module, _, attr = _MODULES[name].partition(":")
    return getattr(importlib.import_module(module), attr or "SCENARIO")
