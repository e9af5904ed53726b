"""Data: real data set readers, the embedded default, partitioners, federated containers."""

from fedctx.data.embedded import EMBEDDED_DOMAINS, DomainData, load_embedded_digits
from fedctx.data.federated import ClientData, FederatedDataset
from fedctx.data.partition import (
    classes_split,
    dirichlet_split,
    domain_dirichlet_split,
    domain_mix_split,
    domain_split,
    iid_split,
    partition_clients,
    shards_split,
)
from fedctx.data.sources import (
    READERS,
    CorruptDataError,
    MissingDataError,
    read_cached,
    read_cifar,
    read_mnist,
    read_mnistm,
    read_svhn,
    read_synthdigits,
    read_usps,
    to_cifar_form,
    to_digits_form,
)

__all__ = [
    "EMBEDDED_DOMAINS",
    "READERS",
    "ClientData",
    "CorruptDataError",
    "DomainData",
    "FederatedDataset",
    "MissingDataError",
    "classes_split",
    "dirichlet_split",
    "domain_dirichlet_split",
    "domain_mix_split",
    "domain_split",
    "iid_split",
    "load_embedded_digits",
    "partition_clients",
    "read_cached",
    "read_cifar",
    "read_mnist",
    "read_mnistm",
    "read_svhn",
    "read_synthdigits",
    "read_usps",
    "shards_split",
    "to_cifar_form",
    "to_digits_form",
]
