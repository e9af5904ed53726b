"""A small CNN for 3x28x28 digits whose normalization layers are chosen by name."""

from __future__ import annotations

import torch
from torch import nn

from fedctx.norm import make_norm

SPATIAL_ONLY_NORMS = frozenset({"instance", "adain"})


class DigitsCNN(nn.Module):
    """Three 5x5 conv blocks and two FC layers, a norm after each (FedBN's digits model, narrower).

    Input ``(N, 3, 28, 28)``, output logits ``(N, num_classes)``. ``norm`` is any name of
    :func:`fedctx.norm.available`; ``num_contexts`` sizes context-aware norms. ``width`` scales the
    channel counts (FedBN uses 64, 64, 128 and FC 2048, 512; the default here is a quarter, so a
    federated round on two CPU cores takes about a second). Norms that normalize over spatial
    positions only (``instance``, ``adain``) are used after the convs; the FC layers then have none.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        norm: str = "context",
        num_contexts: int = 1,
        width: int = 16,
        in_channels: int = 3,
        **norm_options: object,
    ) -> None:
        super().__init__()
        c1, c2, c3, f1, f2 = width, width, 2 * width, 8 * width, 4 * width

        def norm2d(c: int) -> nn.Module:
            return make_norm(norm, c, dims=2, num_contexts=num_contexts, **norm_options)

        def norm1d(c: int) -> nn.Module:
            if norm in SPATIAL_ONLY_NORMS:  # nothing to normalize over in an (N, C) feature
                return nn.Identity()
            return make_norm(norm, c, dims=0, num_contexts=num_contexts, **norm_options)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), norm2d(c1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), norm2d(c2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5, padding=2), norm2d(c3), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 7 * 7, f1), norm1d(f1), nn.ReLU(inplace=True),
            nn.Linear(f1, f2), norm1d(f2), nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
