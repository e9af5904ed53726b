"""The data of one federated run: each client's training partition and context, and a test set
per context."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ClientData:
    """One client's training data.

    ``x``: ``(N, ...)`` inputs; ``y``: ``(N,)`` labels; ``contexts``: ``(N,)`` context id of each
    sample (a client usually holds one domain, so all ids are equal, but a client may hold several).
    """

    x: torch.Tensor
    y: torch.Tensor
    contexts: torch.Tensor

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.contexts)):
            raise ValueError("x, y and contexts must have the same length")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def context(self) -> int:
        """The client's main context: the most frequent id among its samples."""
        return int(torch.mode(self.contexts).values) if len(self.contexts) else 0

    def context_counts(self, num_contexts: int) -> torch.Tensor:
        return torch.bincount(self.contexts, minlength=num_contexts)


@dataclass(frozen=True)
class FederatedDataset:
    """Clients' training partitions plus a held-out test set per context.

    ``context_names[k]`` names context ``k`` (a domain); ``test[k] = (x, y)``.
    ``real_domains`` lists which domains were read from real data (see results' summary);
    ``missing_domains`` the scenario's domains left out because their data were not on disk
    (only with ``--allow-missing-domains``).
    """

    context_names: list[str]
    clients: list[ClientData]
    test: dict[int, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    input_shape: tuple[int, ...]
    real_domains: list[str] = field(default_factory=list)
    missing_domains: list[str] = field(default_factory=list)

    @property
    def num_contexts(self) -> int:
        return len(self.context_names)

    def label_counts(self) -> torch.Tensor:
        """``(clients, classes)`` label counts, for the who-holds-what heat map."""
        return torch.stack([torch.bincount(c.y, minlength=self.num_classes) for c in self.clients])
