"""``digits``: the embedded default, four real-image digit domains, one domain per client.

Domains (contexts): MNIST, USPS, MNIST-M (real subsets shipped in the package) and colour-inverted
MNIST (derived from a disjoint MNIST subset). Client ``i`` holds domain ``i % 4``; a domain's
1,000 training images are split IID among its clients. Each domain's 300 test images are the
server's test set for that context; a client must hold at least one batch (``--clients`` up to
124 at ``--batch-size 32``). With ``--data-dir``, the MNIST domain is read from the real
MNIST there instead (same per-class counts, drawn with the run's seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedctx.config import SimConfig
from fedctx.data import ClientData, FederatedDataset, load_embedded_digits
from fedctx.data.embedded import TEST_PER_CLASS, TRAIN_PER_CLASS, to_common_form
from fedctx.data.partition import assign_domains, check_batch_fits, iid_split
from fedctx.data.sources import read_mnist
from fedctx.scenarios import Scenario


def _real_mnist(root: Path, download: bool, rng: np.random.Generator):
    out = []
    for train, per_class in ((True, TRAIN_PER_CLASS), (False, TEST_PER_CLASS)):
        x, y = read_mnist(root, train=train, download=download)
        idx = np.sort(np.concatenate(
            [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]))
        out += [to_common_form(x[idx]), torch.from_numpy(y[idx])]
    return out


def build(config: SimConfig) -> FederatedDataset:
    SCENARIO.check_model(config.model)  # fail before any data is read
    domains = load_embedded_digits()
    names = list(domains)
    rng = np.random.default_rng(config.seed)
    if config.data_dir:
        x_tr, y_tr, x_te, y_te = _real_mnist(Path(config.data_dir), config.download, rng)
        domains["mnist"] = type(domains["mnist"])("mnist", x_tr, y_tr, x_te, y_te)
    check_batch_fits(config.clients, [len(domains[n].y_train) for n in names], config.batch_size)
    owner = assign_domains(config.clients, len(names))
    clients: list[ClientData | None] = [None] * config.clients
    for k, name in enumerate(names):
        members = np.flatnonzero(owner == k)
        d = domains[name]
        for cid, part in zip(members, iid_split(len(d.y_train), len(members), rng), strict=True):
            idx = torch.from_numpy(part)
            clients[cid] = ClientData(d.x_train[idx], d.y_train[idx],
                                      torch.full((len(idx),), k, dtype=torch.long))
    test = {k: (domains[n].x_test, domains[n].y_test) for k, n in enumerate(names)}
    return FederatedDataset(names, clients, test, num_classes=10, input_shape=(3, 28, 28),
                            real_domains=["mnist", "usps", "mnistm"])


SCENARIO = Scenario(
    name="digits",
    description="embedded MNIST / USPS / MNIST-M / inverted-MNIST, one domain per client",
    build=build,
    model="digits-cnn",
)
