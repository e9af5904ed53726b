"""``digits``: the embedded default, four real-image digit domains, one domain per client.

Domains (contexts): MNIST, USPS, MNIST-M (real subsets shipped in the package) and colour-inverted
MNIST (derived from a disjoint MNIST subset). Client ``i`` holds domain ``i % 4``; a domain's
1,000 training images are split IID among its clients. Each domain's 300 test images are the
server's test set for that context; a client must hold at least one batch (``--clients`` up to
124 at ``--batch-size 32``). With ``--data-dir``, the MNIST domain is read from the real
MNIST there instead (same per-class counts, drawn with the run's seed).

The partition options apply (``fedctx.scenarios._common.federate``): ``--domain-alpha`` gives
clients a mix of domains (every domain's 1,000 images are still dealt out),
``--partition``/``--alpha`` skew labels within a domain, ``--holdout-domain`` keeps a domain out
of training (its 300 test images are evaluated by the server), ``--unlabelled-domains`` and
``--contexts kmeans`` as in ``python -m fedctx.simulate --help``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedctx.config import SimConfig
from fedctx.data import FederatedDataset, load_embedded_digits
from fedctx.data.embedded import TEST_PER_CLASS, TRAIN_PER_CLASS, to_common_form
from fedctx.data.partition import check_batch_fits
from fedctx.data.sources import read_mnist
from fedctx.scenarios import Scenario
from fedctx.scenarios._common import check_domain_options, federate


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
    check_domain_options(config, names)
    rng = np.random.default_rng(config.seed)
    if config.data_dir:
        x_tr, y_tr, x_te, y_te = _real_mnist(Path(config.data_dir), config.download, rng)
        domains["mnist"] = type(domains["mnist"])("mnist", x_tr, y_tr, x_te, y_te)
    training = [n for n in names if n != config.holdout_domain]
    check_batch_fits(config.clients, [len(domains[n].y_train) for n in training],
                     config.batch_size, average=config.partition != "iid"
                     or config.domain_alpha > 0)
    return federate(config, {n: (domains[n].x_train, domains[n].y_train) for n in training},
                    {n: (domains[n].x_test, domains[n].y_test) for n in names}, rng,
                    real_domains=["mnist", "usps", "mnistm"])


SCENARIO = Scenario(
    name="digits",
    description="embedded MNIST / USPS / MNIST-M / inverted-MNIST, one domain per client",
    build=build,
    model="digits-cnn",
)
