"""The data of one federated run: each client's training partition and context, and a test set
per context."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ClientData:
    """One client's training data.

    ``x``: ``(N, ...)`` inputs; ``y``: ``(N,)`` labels, or ``None`` for an unlabelled client
    (``--unlabelled-domains``: it holds images only); ``contexts``: ``(N,)`` context id of each
    sample (with one domain per client all ids are equal; with ``--domain-alpha`` or
    ``--contexts kmeans`` a client holds several).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    contexts: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.contexts) or (self.y is not None and len(self.y) != len(self.x)):
            raise ValueError("x, y and contexts must have the same length")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> bool:
        return self.y is not None

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
    (only with ``--allow-missing-domains``). ``holdout``: ``(name, x, y)``, the test set of the
    domain held out of training (``--holdout-domain``; it is no context). ``unlabelled_domains``:
    the domains whose clients hold no labels. ``context_ari``: with discovered contexts
    (``--contexts kmeans``), the adjusted Rand index of the training samples' contexts against
    their true domains.
    """

    context_names: list[str]
    clients: list[ClientData]
    test: dict[int, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    input_shape: tuple[int, ...]
    real_domains: list[str] = field(default_factory=list)
    missing_domains: list[str] = field(default_factory=list)
    holdout: tuple[str, torch.Tensor, torch.Tensor] | None = None
    unlabelled_domains: list[str] = field(default_factory=list)
    context_ari: float | None = None

    @property
    def num_contexts(self) -> int:
        return len(self.context_names)

    def label_counts(self) -> torch.Tensor:
        """``(clients, classes)`` label counts, for the who-holds-what heat map (a row of zeros
        for an unlabelled client: its labels are not known)."""
        return torch.stack([torch.zeros(self.num_classes, dtype=torch.long) if c.y is None else
                            torch.bincount(c.y, minlength=self.num_classes)
                            for c in self.clients])

    def context_counts(self) -> torch.Tensor:
        """``(clients, contexts)`` samples of each context per client (the mix of domains)."""
        return torch.stack([c.context_counts(self.num_contexts) for c in self.clients])
