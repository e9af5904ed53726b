"""Pictures of a :class:`~fedctx.data.FederatedDataset` (matplotlib, PNG files).

Figures are built with :class:`matplotlib.figure.Figure` directly (rendered by the Agg canvas),
so no pyplot state or global backend is touched and no display is needed.

- :func:`save_label_heatmap`: label counts per client (rows) and class (columns), each client's
  context marked by a coloured strip and named on its row.
- :func:`save_sample_grid`: sample test images of every context (domain), one row per context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedctx.data.federated import FederatedDataset

_ANNOTATE_MAX_CELLS = 400


def _context_colors(num_contexts: int) -> list[tuple[float, ...]]:
    cmap = colormaps["tab10" if num_contexts <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(num_contexts)]


def save_label_heatmap(dataset: FederatedDataset, path: Path | str) -> Path:
    """Write a heat map of ``dataset.label_counts()`` ``(clients, classes)`` to ``path`` (PNG).

    Rows are clients (``c<i>`` plus its main context's name), columns classes; counts are written
    in the cells when there are at most 400 cells. Returns the path written.
    """
    counts = dataset.label_counts().numpy()
    n_clients, n_classes = counts.shape
    contexts = [c.context for c in dataset.clients]
    colors = _context_colors(dataset.num_contexts)
    height = min(2.0 + 0.32 * n_clients, 40.0)
    width = min(3.5 + 0.55 * n_classes, 30.0)
    fig = Figure(figsize=(width, height))
    strip, ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [0.6, n_classes]})
    strip.imshow(np.array(contexts)[:, None], aspect="auto", interpolation="nearest",
                 cmap=ListedColormap(colors), vmin=-0.5, vmax=dataset.num_contexts - 0.5)
    strip.set_xticks([])
    strip.set_yticks(range(n_clients))
    strip.set_yticklabels([f"c{i} {dataset.context_names[k]}" for i, k in enumerate(contexts)],
                          fontsize=8 if n_clients <= 40 else 5)
    strip.set_ylabel("client and its context")
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(n_classes) if n_classes <= 20 else range(0, n_classes, 10))
    ax.set_xlabel("class")
    ax.tick_params(axis="y", left=False)
    if counts.size <= _ANNOTATE_MAX_CELLS:
        threshold = counts.max() / 2
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="black" if value > threshold else "white")
    fig.colorbar(image, ax=ax, label="samples", fraction=0.04, pad=0.02)
    handles = [Patch(color=colors[k], label=name) for k, name in enumerate(dataset.context_names)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False, title="context")
    k = dataset.num_contexts
    title = f"label counts per client ({n_clients} clients, {k} context{'s' * (k != 1)})"
    if dataset.missing_domains:
        title += f"; missing: {', '.join(dataset.missing_domains)}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - min(0.6 / height, 0.15)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _to_image(x: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] -> ``(H, W, 3)`` in [0, 1]."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def save_sample_grid(dataset: FederatedDataset, path: Path | str, per_context: int = 10) -> Path:
    """Write a grid of test images to ``path`` (PNG): one row per context, ``per_context``
    columns, taking one image of each class in turn (label shown above the image).

    Images are expected in the common form ``(3, H, W)`` in [-1, 1]. Returns the path written.
    """
    rows = dataset.num_contexts
    fig = Figure(figsize=(1.1 * per_context + 1.2, 1.25 * rows))
    axes = fig.subplots(rows, per_context, squeeze=False)
    for k, name in enumerate(dataset.context_names):
        x, y = dataset.test[k]
        order = _one_per_class(y.numpy(), per_context)
        for j, ax in enumerate(axes[k]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(order):
                ax.imshow(_to_image(x[order[j]]), interpolation="nearest")
                ax.set_title(str(int(y[order[j]])), fontsize=8, pad=2)
        axes[k][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    missing = dataset.missing_domains
    note = f" (missing: {', '.join(missing)})" if missing else ""
    real = ", ".join(dataset.real_domains) or "none"
    fig.suptitle(f"test images per context; real data: {real}{note}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _one_per_class(labels: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices cycling through the classes present (first occurrences first)."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out: list[int] = []
    depth = 0
    while len(out) < min(n, len(labels)):
        for idx in by_class:
            if depth < len(idx) and len(out) < n:
                out.append(int(idx[depth]))
        depth += 1
    return out
