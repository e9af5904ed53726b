"""Named scenarios: a recipe of data + domains (contexts) + partition + default model.

A scenario is a :class:`Scenario` registered here; its default options live in
``configs/<name>.toml`` (used as the base that ``--config`` and flags override).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedctx.config import CONFIG_DIR, SimConfig
from fedctx.data import FederatedDataset


@dataclass(frozen=True)
class Scenario:
    """``build(config) -> FederatedDataset`` plus the model used by default."""

    name: str
    description: str
    build: Callable[[SimConfig], FederatedDataset]
    model: str = "digits-cnn"

    def defaults(self) -> dict[str, Any]:
        """Options from ``configs/<name>.toml`` if that file exists (else none)."""
        from fedctx.config import load_config_file

        path = CONFIG_DIR / f"{self.name}.toml"
        return load_config_file(path) if path.exists() else {}


_MODULES = {
    "digits": "simulations.digits",
    "digits5": "simulations.digits5",
    "mnist-usps": "simulations.adaptation_pairs:MNIST_USPS",
    "mnist-mnistm": "simulations.adaptation_pairs:MNIST_MNISTM",
    "mnist-svhn": "simulations.adaptation_pairs:MNIST_SVHN",
    "cifar10-dirichlet": "simulations.cifar10_dirichlet",
}


def available() -> list[str]:
    return sorted(_MODULES)


def get_scenario(name: str) -> Scenario:
    """The scenario ``name``; ``ValueError`` naming the valid choices if unknown."""
    if name not in _MODULES:
        raise ValueError(f"unknown scenario {name!r}; valid choices: {', '.join(available())}")
    module, _, attr = _MODULES[name].partition(":")
    return getattr(importlib.import_module(module), attr or "SCENARIO")
