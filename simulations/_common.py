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

from fedctx.config import ConfigError, SimConfig
from fedctx.data import ClientData, FederatedDataset
from fedctx.data.contexts import (
    adjusted_rand_index,
    assign_contexts,
    federated_kmeans,
    image_features,
    standardise,
)
from fedctx.data.partition import (
    assign_domains,
    clients_per_domain,
    max_clients,
    partition_clients,
)
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


def check_domain_options(config: SimConfig, names: list[str]) -> None:
    """One-line :class:`ConfigError` for ``--holdout-domain`` / ``--unlabelled-domains`` that
    name no domain of the scenario (``names``), that leave no domain to train on, or no labelled
    one. Names only: runs before any data is read."""
    valid = ", ".join(names)
    for flag, given in (("--holdout-domain", [config.holdout_domain] * bool(config.holdout_domain)),
                        ("--unlabelled-domains", config.unlabelled_list())):
        for name in given:
            if name not in names:
                raise ConfigError(f"{flag}: {name!r} is no domain of scenario "
                                  f"{config.scenario!r}; valid choices: {valid}")
    training = [n for n in names if n != config.holdout_domain]
    if not training:
        raise ConfigError(f"--holdout-domain {config.holdout_domain}: no domain would be left "
                          "to train on")
    if set(training) <= set(config.unlabelled_list()):
        raise ConfigError(f"--unlabelled-domains {config.unlabelled_domains}: no training domain "
                          "would keep its labels; leave at least one labelled")


def refuse_domain_options(config: SimConfig, why: str) -> None:
    """For a scenario with a single domain: one-line :class:`ConfigError` for any option that
    needs several (``why`` says what the scenario is)."""
    given = [(f"--domain-alpha {config.domain_alpha}", config.domain_alpha > 0),
             (f"--holdout-domain {config.holdout_domain}", bool(config.holdout_domain)),
             (f"--unlabelled-domains {config.unlabelled_domains}", bool(config.unlabelled_domains)),
             ("--contexts kmeans", config.contexts == "kmeans")]
    for flag, on in given:
        if on:
            raise ConfigError(f"{flag}: scenario {config.scenario!r} {why}; it applies to the "
                              "digits scenarios (digits, digits5, mnist-usps, mnist-mnistm, "
                              "mnist-svhn)")


#: The k-means of ``--contexts kmeans`` draws from its own generator, seeded with the run's seed
#: and this tag, so that it never shifts the partition's draws.
KMEANS_STREAM = 0x6B6D


def federate(config: SimConfig, train: dict[str, tuple[torch.Tensor, torch.Tensor]],
             test: dict[str, tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator, *,
             real_domains: list[str], missing_domains: list[str] | None = None,
             num_classes: int = 10) -> FederatedDataset:
    """The federation of the digits scenarios from each training domain's pool (``train``,
    in context order) and every domain's test set (``test``; it also holds the
    ``--holdout-domain``'s, which has no pool).

    Clients are cut with :func:`~fedctx.data.partition.partition_clients` (``--domain-alpha``,
    ``--partition``, ``--alpha``; ``rng`` draws it); a client of an ``--unlabelled-domains``
    domain gets ``y = None``; with ``--contexts kmeans`` a sample's context becomes its
    federated k-means cluster (:mod:`fedctx.data.contexts`), and each context's test set is the
    test images of the training domains assigned to it. Images ``(C, H, W)``.
    """
    names = list(train)
    x = torch.cat([train[n][0] for n in names])
    y = torch.cat([train[n][1] for n in names])
    d = torch.cat([torch.full((len(train[n][1]),), k, dtype=torch.long)
                   for k, n in enumerate(names)])
    parts = [torch.from_numpy(p) for p in partition_clients(
        d.numpy(), y.numpy(), config.clients, rng, domain_alpha=config.domain_alpha,
        partition=config.partition, alpha=config.alpha)]
    unlabelled = config.unlabelled_list()
    clients = [ClientData(x[p], None if names[int(d[p[0]])] in unlabelled else y[p], d[p])
               for p in parts]
    contexts, tests, ari = names, {k: test[n] for k, n in enumerate(names)}, None
    if config.contexts == "kmeans":
        clients, tests, ari = _discover_contexts(config, clients, [test[n] for n in names])
        contexts = [f"cluster{k}" for k in range(config.num_contexts or len(names))]
    holdout = ((config.holdout_domain, *test[config.holdout_domain])
               if config.holdout_domain else None)
    return FederatedDataset(contexts, clients, tests, num_classes=num_classes,
                            input_shape=tuple(x.shape[1:]), real_domains=real_domains,
                            missing_domains=list(missing_domains or []), holdout=holdout,
                            unlabelled_domains=unlabelled, context_ari=ari)


def _discover_contexts(config: SimConfig, clients: list[ClientData],
                       tests: list[tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[list[ClientData], dict[int, tuple[torch.Tensor, torch.Tensor]],
                                  float]:
    """Clients with k-means contexts, each context's test set, and the adjusted Rand index of
    the training samples' contexts against their domains."""
    k = config.num_contexts or len(tests)
    features = [image_features(c.x) for c in clients]
    mean, std = standardise(features)
    features = [(f - mean) / std for f in features]
    centroids = federated_kmeans(features, k, np.random.default_rng([config.seed, KMEANS_STREAM]))
    found = [assign_contexts(f, centroids) for f in features]
    ari = adjusted_rand_index(torch.cat([c.contexts for c in clients]), torch.cat(found))
    x_test = torch.cat([x for x, _ in tests])
    y_test = torch.cat([y for _, y in tests])
    test_ctx = assign_contexts((image_features(x_test) - mean) / std, centroids)
    test = {c: (x_test[test_ctx == c], y_test[test_ctx == c]) for c in range(k)
            if bool((test_ctx == c).any())}
    return ([ClientData(c.x, c.y, ctx) for c, ctx in zip(clients, found, strict=True)], test, ari)


def _sample(labels: np.ndarray, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if n > len(labels):
        raise ValueError(f"{what}: {n} samples needed but only {len(labels)} available; use fewer "
                         "--clients")
    return np.sort(rng.choice(len(labels), size=n, replace=False))


def digit_federation(names: list[str], config: SimConfig, per_client: int = PER_CLIENT,
                     test_per_domain: int = TEST_PER_DOMAIN) -> FederatedDataset:
    """``per_client`` training images per client from the training domains present (all but
    ``--holdout-domain``): the pool of domain ``k`` holds ``per_client`` images for each client
    round-robin would give it, cut by :func:`federate` (one domain per client by default);
    contexts = domains; images ``(3, 28, 28)`` in [-1, 1] (see ``to_digits_form``).
    """
    from fedctx.scenarios import get_scenario

    get_scenario(config.scenario).check_model(config.model)  # fail before any data is read
    check_domain_options(config, names)
    raw, missing = read_domains(names, config)
    if config.holdout_domain in missing:
        raise MissingDataError(f"--holdout-domain {config.holdout_domain}: its data are missing "
                               f"({', '.join(missing)} not found under {data_root(config)})")
    present = [n for n in names if n in raw]
    training = [n for n in present if n != config.holdout_domain]
    check_clients_fit(config, [len(raw[n][1]) for n in training], training, per_client)
    owner = assign_domains(config.clients, len(training))
    train, test = {}, {}
    for name in present:
        x_tr, y_tr, x_te, y_te = raw[name]
        rng = np.random.default_rng([config.seed, names.index(name)])
        if name in training:
            n_train = per_client * int(np.sum(owner == training.index(name)))
            tr = _sample(y_tr, n_train, rng, f"{name} training split")
            train[name] = (to_digits_form(x_tr[tr]), torch.from_numpy(y_tr[tr]))
        te = _sample(y_te, min(test_per_domain, len(y_te)), rng, f"{name} test split")
        test[name] = (to_digits_form(x_te[te]), torch.from_numpy(y_te[te]))
    return federate(config, train, test, np.random.default_rng(config.seed),
                    real_domains=present, missing_domains=missing)
