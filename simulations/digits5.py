"""``digits5``: FedBN's digits benchmark (Li et al. 2021) on the real data sets.

Five domains, each its own context: MNIST, SVHN, USPS, SynthDigits, MNIST-M. Client ``i`` holds
domain ``i % 5`` (FedBN: 5 clients, one per domain; more clients give several per domain). Every
client holds 743 training images of its domain (FedBN's 10% share), drawn without replacement
from the official training split; each context's test set is 2,000 random images of the domain's
official test split. Images: float32 ``(3, 28, 28)`` in [-1, 1], grey replicated, 32x32 domains
resized bilinearly (``fedctx.data.sources.to_digits_form``). Data are read from ``--data-dir``
(else ``$FEDCTX_DATA``, else ``./data``); ``--allow-missing-domains`` runs without the absent ones.
"""

from __future__ import annotations

from fedctx.config import SimConfig
from fedctx.data import FederatedDataset
from fedctx.scenarios import Scenario
from fedctx.scenarios._common import digit_federation

DOMAINS = ["mnist", "svhn", "usps", "synthdigits", "mnistm"]


def build(config: SimConfig) -> FederatedDataset:
    return digit_federation(DOMAINS, config)


SCENARIO = Scenario(
    name="digits5",
    description="FedBN's MNIST / SVHN / USPS / SynthDigits / MNIST-M, 743 images per client",
    build=build,
    model="digits-cnn",
)
