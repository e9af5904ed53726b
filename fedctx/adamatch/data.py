"""Digit domains for domain adaptation, in the digits form ``(N, 3, 28, 28)``.

Images are kept as ``uint8`` (a quarter of the memory of float32) and turned into floats per
batch. The readers are :mod:`fedctx.data.sources`; the conversion is
:func:`fedctx.data.sources.to_digits_form` (grey replicated to RGB, bilinear resize to 28x28).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedctx.adamatch.config import DOMAIN_NAMES
from fedctx.data import sources

Reader = Callable[..., tuple[np.ndarray, np.ndarray]]

#: Domain name (the options' :data:`~fedctx.adamatch.config.DOMAIN_NAMES`) -> its reader in
#: :mod:`fedctx.data.sources`, ``read_<name>(root, train) -> (images uint8, labels int64)``.
DOMAINS: dict[str, Reader] = {name: getattr(sources, f"read_{name}") for name in DOMAIN_NAMES}


@dataclass
class DomainSplit:
    """One split of one domain: ``images`` uint8 ``(N, 3, 28, 28)``, ``labels`` int64 ``(N,)``."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _as_uint8_digits(images: np.ndarray, chunk: int = 8192) -> torch.Tensor:
    parts = []
    for start in range(0, len(images), chunk):
        x = sources.to_digits_form(images[start:start + chunk], 28)  # [-1, 1]
        parts.append(((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts)


def load_domain(name: str, root: Path, *, train: bool, limit: int = 0, seed: int = 0,
                download: bool = False) -> DomainSplit:
    """Read domain ``name`` from ``root``; keep a random subset of ``limit`` samples if ``limit``.

    Raises:
        ValueError: unknown domain name (the message lists the valid ones).
        fedctx.data.MissingDataError: the files are not on disk.
    """
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; valid choices: {', '.join(DOMAINS)}")
    images, labels = DOMAINS[name](Path(root), train, download)
    if limit and limit < len(labels):
        keep = np.random.default_rng(seed).permutation(len(labels))[:limit]
        keep.sort()
        images, labels = images[keep], labels[keep]
    return DomainSplit(name, _as_uint8_digits(images), torch.from_numpy(labels).long())


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float ``[0, 1]`` (the augmentations' range)."""
    return images.float().div_(255.0)


def normalize(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``[0, 1]`` -> ``[-1, 1]``, the model's input range (``(x - 0.5) / 0.5``); ``inplace``
    overwrites ``x`` (same values, no new tensor)."""
    return (x.sub_(0.5) if inplace else x.sub(0.5)).div_(0.5)


class BatchSampler:
    """Endless random batches of indices into ``n`` samples, reshuffled every epoch."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        if n < 1:
            raise ValueError("cannot sample batches from an empty split")
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self._order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        """A ``LongTensor[batch_size]`` of indices."""
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.gen)])
        idx, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return idx

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Where the sampler is: the indices left of this epoch's order (the generator, which
        may be shared, is saved by its owner)."""
        return {"order": self._order.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._order = state["order"].clone()
