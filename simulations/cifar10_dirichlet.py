"""``cifar10-dirichlet``: CIFAR-10 with Dirichlet label skew (Hsu et al. 2019), one context.

All 50,000 training images are split among the clients with, per class, shares drawn from
Dirichlet(0.5) (the scenario's defaults ``partition = "dirichlet"``, ``alpha = 0.5`` in
``configs/cifar10-dirichlet.toml``; ``--partition iid|shards`` and ``--alpha`` change it; every
client gets at least :data:`MIN_PER_CLIENT` images, and
``--clients`` is refused when the mean share is under one ``--batch-size``); the
10,000 test images are the test set of the single context ``cifar10``. Images: float32
``(3, 32, 32)`` in [-1, 1] (``(x / 255 - 0.5) / 0.5``). Read from ``--data-dir`` (else
``$FEDCTX_DATA``, else ``./data``) in torchvision's ``cifar-10-batches-py`` layout; ``--download``
fetches it through torchvision.
"""

from __future__ import annotations

import numpy as np
import torch

from fedctx.config import SimConfig
from fedctx.data import ClientData, FederatedDataset
from fedctx.data.partition import check_batch_fits, partition_clients
from fedctx.data.sources import read_cached, to_cifar_form
from fedctx.scenarios import MODELS_32, Scenario
from fedctx.scenarios._common import data_root, refuse_domain_options

MIN_PER_CLIENT = 10


def build(config: SimConfig) -> FederatedDataset:
    SCENARIO.check_model(config.model)  # fail before any data is read
    refuse_domain_options(config, "has one domain (cifar10)")
    root = str(data_root(config))
    x_tr, y_tr = read_cached("cifar10", root, True, config.download)
    x_te, y_te = read_cached("cifar10", root, False, config.download)
    check_batch_fits(config.clients, [len(y_tr)], config.batch_size, average=True)
    parts = partition_clients(np.zeros(len(y_tr), dtype=np.int64), y_tr, config.clients,
                              np.random.default_rng(config.seed), partition=config.partition,
                              alpha=config.alpha,
                              min_size=min(MIN_PER_CLIENT, len(y_tr) // config.clients))
    clients = [ClientData(to_cifar_form(x_tr[p]), torch.from_numpy(y_tr[p]),
                          torch.zeros(len(p), dtype=torch.long)) for p in parts]
    test = {0: (to_cifar_form(np.array(x_te)), torch.from_numpy(np.array(y_te)))}
    return FederatedDataset(["cifar10"], clients, test, num_classes=10, input_shape=(3, 32, 32),
                            real_domains=["cifar10"])


SCENARIO = Scenario(
    name="cifar10-dirichlet",
    description="CIFAR-10, Dirichlet(0.5) label skew over clients, one context",
    build=build,
    model="resnet20",
    models=MODELS_32,
    input_shape=(3, 32, 32),
)
