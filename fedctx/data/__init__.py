"""Data: real data set readers, the embedded default, partitioners, federated containers."""

from fedctx.data.embedded import EMBEDDED_DOMAINS, DomainData, load_embedded_digits
from fedctx.data.federated import ClientData, FederatedDataset
from fedctx.data.sources import MissingDataError

__all__ = [
    "EMBEDDED_DOMAINS",
    "ClientData",
    "DomainData",
    "FederatedDataset",
    "MissingDataError",
    "load_embedded_digits",
]
