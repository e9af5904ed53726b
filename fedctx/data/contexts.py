"""Discovered contexts (``--contexts kmeans``): clients' images clustered into ``K`` contexts by
federated k-means on a fixed image feature, and the adjusted Rand index that says how well the
clusters recover the true domains.

Feature (22 numbers per image, :func:`image_features`): the per-channel mean and standard
deviation of the image (6: colour and contrast, which is what tells MNIST, USPS and MNIST-M
apart) plus a 4x4 average-pooled thumbnail of its channel mean (16: coarse layout, stroke
thickness and background). Each dimension is standardised with the federation's mean and
standard deviation (clients send their sums and sums of squares).

Federated k-means (:func:`federated_kmeans`), run once at data-build time, no image leaves a
client, only sums:

1. Initialisation, k-means++ (Arthur & Vassilvitskii 2007) done federatedly with a seeded
   generator: the first centroid is the feature of a random sample of a random client (chosen
   in proportion to client size); each next one is drawn with probability proportional to the
   squared distance to the nearest centroid so far (each client reports its sum of squared
   distances, the server picks a client in proportion, that client picks its sample).
2. ``iters`` Lloyd iterations: each client assigns its samples to the nearest centroid and
   sends, per centroid, the sum of its features and their count; the server divides the summed
   sums by the summed counts (a centroid that no sample chose stays where it was); it stops
   early when no centroid moves.

A sample's context is its nearest centroid; test images are assigned the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def image_features(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` images -> ``(N, 2C + 16)`` float64 features: per-channel mean and std,
    then the 4x4 average-pooled channel-mean image."""
    x = x.to(torch.float64)
    flat = x.flatten(2)
    thumb = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)
    return torch.cat([flat.mean(2), flat.std(2, correction=0), thumb], dim=1)


def _nearest(features: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centroid, squared distance to it), each ``(N,)``."""
    d2 = torch.cdist(features, centroids).square()
    best = d2.min(1)
    return best.indices, best.values


def standardise(client_features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The federation's per-dimension mean and std from each client's sums (std of 0 -> 1)."""
    n = sum(len(f) for f in client_features)
    total = sum(f.sum(0) for f in client_features)
    squares = sum(f.square().sum(0) for f in client_features)
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def federated_kmeans(client_features: list[torch.Tensor], k: int, rng: np.random.Generator,
                     iters: int = 20) -> torch.Tensor:
    """``(k, F)`` centroids of the clients' ``(N_i, F)`` features (see the module docstring).

    Raises:
        ValueError: fewer samples in the federation than ``k``.
    """
    sizes = np.array([len(f) for f in client_features], dtype=np.float64)
    if sizes.sum() < k:
        raise ValueError(f"--num-contexts {k}: the clients hold only {int(sizes.sum())} images")
    client = rng.choice(len(sizes), p=sizes / sizes.sum())
    centroids = [client_features[client][rng.integers(sizes[client])]]
    while len(centroids) < k:
        c = torch.stack(centroids)
        d2 = [_nearest(f, c)[1].numpy() if len(f) else np.zeros(0) for f in client_features]
        mass = np.array([d.sum() for d in d2])
        if mass.sum() <= 0:  # every sample sits on a centroid: take any
            mass = sizes
            d2 = [np.ones(len(f)) for f in client_features]
        client = rng.choice(len(mass), p=mass / mass.sum())
        centroids.append(client_features[client][rng.choice(len(d2[client]),
                                                            p=d2[client] / d2[client].sum())])
    c = torch.stack(centroids)
    for _ in range(iters):
        sums = torch.zeros_like(c)
        counts = torch.zeros(k, dtype=torch.float64)
        for f in client_features:  # each client's per-centroid sums and counts
            idx = _nearest(f, c)[0]
            sums.index_add_(0, idx, f)
            counts += torch.bincount(idx, minlength=k).to(torch.float64)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if torch.equal(new, c):
            break
        c = new
    return c


def assign_contexts(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int64 context id of each feature row: its nearest centroid."""
    return _nearest(features, centroids)[0].to(torch.long)


def adjusted_rand_index(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Adjusted Rand index of two labelings of the same ``(N,)`` samples (Hubert & Arabie
    1985): 1 for identical partitions (up to renaming), about 0 for independent ones.

    ``ARI = (sum_ij C(n_ij, 2) - E) / (0.5 (sum_i C(a_i, 2) + sum_j C(b_j, 2)) - E)`` with
    ``E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2)``, ``n_ij`` the contingency table.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings must be two (N,) arrays, got {a.shape} and {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max(initial=-1) + 1, bi.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(n: np.ndarray) -> float:
        return float((n * (n - 1) // 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    best = 0.5 * (rows + cols)
    if best == expected:  # both labelings trivial (one cluster, or all singletons)
        return 1.0
    return (index - expected) / (best - expected)
