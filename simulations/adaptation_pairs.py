"""The adaptation pairs as two-context federations: ``mnist-usps``, ``mnist-mnistm``,
``mnist-svhn``.

Contexts: 0 = MNIST (source), 1 = the target domain. Client ``i`` holds domain ``i % 2``, 743
training images each (FedBN's per-client count), drawn without replacement from the official
training split; each context's test set is 2,000 random images of the official test split (all of
it when smaller). Images: float32 ``(3, 28, 28)`` in [-1, 1] (``to_digits_form``). MNIST-M is read
in its original release layout; SVHN from ``SVHN/{train,test}_32x32.mat``.
"""

from __future__ import annotations

from functools import partial

from fedctx.scenarios import Scenario
from fedctx.scenarios._common import digit_federation


def _pair(target: str, label: str) -> Scenario:
    return Scenario(
        name=f"mnist-{target}",
        description=f"MNIST -> {label} adaptation pair, one domain per client",
        build=partial(digit_federation, ["mnist", target]),
        model="digits-cnn",
    )


MNIST_USPS = _pair("usps", "USPS")
MNIST_MNISTM = _pair("mnistm", "MNIST-M")
MNIST_SVHN = _pair("svhn", "SVHN")
