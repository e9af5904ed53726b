"""Pictures of a :class:`~fedctx.data.FederatedDataset` (matplotlib, PNG files).

Figures are built with :class:`matplotlib.figure.Figure` directly (rendered by the Agg canvas),
so no pyplot state or global backend is touched and no display is needed.

- :func:`save_label_heatmap`: per client (rows), its mix of contexts (domains; left panel,
  share of its samples per context) and its label counts per class (right panel); each row
  names the client's main context, and says when the client holds no labels.
- :func:`save_sample_grid`: sample test images of every context (domain), one row per context.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from fedctx.data.federated import FederatedDataset

_ANNOTATE_MAX_CELLS = 400
_NAMED_ROWS_MAX = 100  # more clients: every n-th row is named (10,000 tick labels took 2 min)


def _save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file, then a rename): a killed run never
    leaves half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def _annotate(ax, values: np.ndarray, text: np.ndarray,  # noqa: ANN001 - an Axes
              light_high: bool = True) -> None:
    """Write ``text`` in the cells (when at most 400), in black on light cells: high values
    are light with ``light_high`` (viridis), dark otherwise (Blues)."""
    if values.size > _ANNOTATE_MAX_CELLS:
        return
    threshold = values.max() / 2 if values.size else 0
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, str(text[i, j]), ha="center", va="center", fontsize=7,
                color="black" if (value > threshold) == light_high else "white")


def save_label_heatmap(dataset: FederatedDataset, path: Path | str) -> Path:
    """Write the who-holds-what picture of ``dataset`` to ``path`` (PNG): per client (rows),
    its share of samples per context (left, ``dataset.context_counts()`` ``(clients,
    contexts)``, normalised per row) and its label counts (right, ``dataset.label_counts()``
    ``(clients, classes)``). Rows are named ``c<i>`` plus the client's main context, and
    ``(unlabelled)`` for a client without labels (its label row is empty); with more than 100
    clients only every n-th row is named. Counts are written in the cells when there are at most
    400. Returns the path written.
    """
    counts = dataset.label_counts().numpy()
    mix = dataset.context_counts().numpy()
    share = mix / np.maximum(mix.sum(1, keepdims=True), 1)
    n_clients, n_classes = counts.shape
    k = dataset.num_contexts
    height = min(2.0 + 0.32 * n_clients, 40.0)
    width = min(4.0 + 0.55 * (n_classes + k), 34.0)
    fig = Figure(figsize=(width, height))
    left, ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [max(k, 1.5),
                                                                             n_classes]})
    left.imshow(share, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    _annotate(left, share, mix, light_high=False)
    left.set_xticks(range(k))
    left.set_xticklabels(dataset.context_names, rotation=45, ha="right", fontsize=7)
    named = range(0, n_clients, -(-n_clients // _NAMED_ROWS_MAX))  # every row, or a stride
    left.set_yticks(named)
    left.set_yticklabels([f"c{i} {dataset.context_names[dataset.clients[i].context]}"
                          + ("" if dataset.clients[i].labelled else " (unlabelled)")
                          for i in named], fontsize=8 if len(named) <= 40 else 5)
    left.set_ylabel("client and its main context")
    left.set_title("samples per context", fontsize=9)
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(n_classes) if n_classes <= 20 else range(0, n_classes, 10))
    ax.set_xlabel("class")
    ax.tick_params(axis="y", left=False)
    _annotate(ax, counts, counts)
    fig.colorbar(image, ax=ax, label="samples", fraction=0.04, pad=0.02)
    title = f"label counts per client ({n_clients} clients, {k} context{'s' * (k != 1)})"
    if dataset.missing_domains:
        title += f"; missing: {', '.join(dataset.missing_domains)}"
    if dataset.holdout is not None:
        title += f"; held out: {dataset.holdout[0]}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save_png(fig, Path(path))


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
    return _save_png(fig, Path(path))


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
