"""``mnist-usps``: the MNIST -> USPS adaptation pair as a two-context federation.

Contexts: 0 = MNIST (source), 1 = USPS (target). Client ``i`` holds domain ``i % 2``, 743
training images each (FedBN's per-client count), drawn without replacement from the official
training split; each context's test set is 2,000 random images of the official test split (all of
it when smaller). Images: float32 ``(3, 28, 28)`` in [-1, 1] (``to_digits_form``).
"""

from __future__ import annotations

from fedctx.config import SimConfig
from fedctx.data import FederatedDataset
from simulations import Scenario
from simulations._common import digit_federation

DOMAINS = ["mnist", "usps"]


def build(config: SimConfig) -> FederatedDataset:
    return digit_federation(DOMAINS, config)


SCENARIO = Scenario(
    name="mnist-usps",
    description="MNIST -> USPS adaptation pair, one domain per client",
    build=build,
    model="digits-cnn",
)
