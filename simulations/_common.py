"""Shared recipe of the real-data scenarios: read domains (or record them missing), sample them
into the common form, partition them into clients.

Sample counts follow FedBN's digits protocol (Li et al. 2021): every client holds
:data:`PER_CLIENT` = 743 training images of its domain (FedBN: 10% of a 7,438-image training pool
per domain), drawn without replacement from the domain's official training split; each domain's
test set (one per context) is :data:`TEST_PER_DOMAIN` = 2,000 random images of its official test
split (all of it when smaller). Domain ``k``'s subsets are drawn with ``seed`` and ``k`` only, so
they do not change when another domain is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedctx.config import SimConfig
from fedctx.data import ClientData, FederatedDataset
from fedctx.data.partition import assign_domains, clients_per_domain, domain_split, max_clients
from fedctx.data.sources import MissingDataError, default_data_dir, read_cached, to_digits_form

PER_CLIENT = 743
TEST_PER_DOMAIN = 2000

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def data_root(config: SimConfig) -> Path:
    """``--data-dir`` if given, else ``$FEDCTX_DATA``, else ``./data``."""
    return Path(config.data_dir) if config.data_dir else default_data_dir()


def read_domains(names: list[str], config: SimConfig) -> tuple[dict[str, Arrays], list[str]]:
    """Read each domain's ``(x_train, y_train, x_test, y_test)`` raw arrays, in ``names`` order.

    Returns the domains read and the names of those missing. Missing domains are allowed only
    with ``config.allow_missing_domains`` and when at least one domain remains.

    Raises:
        MissingDataError: one line naming the first missing data set, its folder and how to get
            it (and the ``--allow-missing-domains`` way out when other domains are present).
    """
    root = data_root(config)
    found: dict[str, Arrays] = {}
    errors: dict[str, MissingDataError] = {}
    for name in names:
        try:
            found[name] = (*read_cached(name, str(root), True, config.download),
                           *read_cached(name, str(root), False, config.download))
        except MissingDataError as err:
            errors[name] = err
    if errors and not (config.allow_missing_domains and found):
        first = next(iter(errors.values()))
        hint = (f"; or pass --allow-missing-domains to run without {', '.join(errors)}"
                if found and not config.allow_missing_domains else "")
        raise MissingDataError(f"{first}{hint}")
    return found, list(errors)


def check_clients_fit(config: SimConfig, train_sizes: list[int], names: list[str],
                      per_client: int) -> None:
    """Refuse, in one line, a ``--batch-size`` above ``per_client`` (a client would hold fewer
    images than one batch) or more ``--clients`` than the domains' training splits can fill with
    ``per_client`` images each (naming the largest ``--clients`` that works). Arithmetic only:
    runs before any array of clients is made."""
    if config.batch_size > per_client:
        raise ValueError(f"--batch-size {config.batch_size}: each client holds {per_client} "
                         f"training images, fewer than one batch; use --batch-size <= "
                         f"{per_client}")
    capacity = [n // per_client for n in train_sizes]
    for name, n, cap, count in zip(names, train_sizes, capacity,
                                   clients_per_domain(config.clients, len(names)), strict=True):
        if count > cap:
            best = max_clients(capacity)
            fix = (f"the largest --clients that works is {best}" if best >= len(names) else
                   f"{name} cannot fill one client")
            raise ValueError(f"--clients {config.clients}: {name} would need {count} clients x "
                             f"{per_client} images but has {n} training images; {fix}")


def _sample(labels: np.ndarray, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if n > len(labels):
        raise ValueError(f"{what}: {n} samples needed but only {len(labels)} available; use fewer "
                         "--clients")
    return np.sort(rng.choice(len(labels), size=n, replace=False))


def digit_federation(names: list[str], config: SimConfig, per_client: int = PER_CLIENT,
                     test_per_domain: int = TEST_PER_DOMAIN) -> FederatedDataset:
    """One domain per client (round-robin over the domains present), ``per_client`` training
    images each; contexts = domains; images ``(3, 28, 28)`` in [-1, 1] (see ``to_digits_form``).
    """
    from fedctx.scenarios import get_scenario

    get_scenario(config.scenario).check_model(config.model)  # fail before any data is read
    raw, missing = read_domains(names, config)
    present = [n for n in names if n in raw]
    check_clients_fit(config, [len(raw[n][1]) for n in present], present, per_client)
    owner = assign_domains(config.clients, len(present))
    xs, ys, ds, test = [], [], [], {}
    for k, name in enumerate(present):
        x_tr, y_tr, x_te, y_te = raw[name]
        rng = np.random.default_rng([config.seed, names.index(name)])
        n_train = per_client * int(np.sum(owner == k))
        tr = _sample(y_tr, n_train, rng, f"{name} training split")
        te = _sample(y_te, min(test_per_domain, len(y_te)), rng, f"{name} test split")
        xs.append(to_digits_form(x_tr[tr]))
        ys.append(torch.from_numpy(y_tr[tr]))
        ds.append(torch.full((len(tr),), k, dtype=torch.long))
        test[k] = (to_digits_form(x_te[te]), torch.from_numpy(y_te[te]))
    x, y, d = torch.cat(xs), torch.cat(ys), torch.cat(ds)
    parts = domain_split(d.numpy(), config.clients, np.random.default_rng(config.seed))
    clients = [ClientData(x[torch.from_numpy(p)], y[torch.from_numpy(p)], d[torch.from_numpy(p)])
               for p in parts]
    return FederatedDataset(present, clients, test, num_classes=10, input_shape=(3, 28, 28),
                            real_domains=present, missing_domains=missing)
