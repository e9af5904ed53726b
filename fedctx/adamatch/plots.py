"""Figures of an AdaMatch run: training curves, gradient variance, 2-D feature embedding (each
written atomically, :func:`fedctx.results.save_figure`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fedctx.adamatch.data import DomainSplit  # noqa: E402
from fedctx.adamatch.evaluate import predict  # noqa: E402
from fedctx.results import save_figure  # noqa: E402


def plot_curves(records: list[dict[str, float]], evals: list[dict[str, float]], path: Path,
                title: str) -> None:
    """Losses, mask rate / pseudo-label accuracy and source/target accuracy against steps."""
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "source_loss", "target_loss"):
        axes[0].plot(steps, [r[key] for r in records], label=key, lw=0.8)
    axes[0].set(xlabel="step", ylabel="loss", yscale="log")
    axes[1].plot(steps, [r["mask_rate"] for r in records], label="mask rate", lw=0.8)
    axes[1].plot(steps, [r["pseudo_label_acc"] for r in records], label="pseudo-label acc "
                 "(masked)", lw=0.8)
    axes[1].plot(steps, [r["target_weight"] for r in records], label="target weight mu(t)")
    axes[1].set(xlabel="step", ylim=(0, 1.02))
    es = [e["step"] for e in evals]
    axes[2].plot(es, [e["target_acc"] for e in evals], "o-", label="target (EMA)")
    axes[2].plot(es, [e["target_acc_raw"] for e in evals], "s--", label="target (raw)")
    axes[2].plot(es, [e["source_acc"] for e in evals], "^-", label="source (EMA)")
    axes[2].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.02))
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_grad_variance(series: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Variance of the gradient entries at each step, log scale, one line per label (e.g. per
    norm), as the UAN paper's Fig. 5."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in series.items():
        ax.plot([r["step"] for r in records], [r["grad_var"] for r in records], lw=0.8,
                label=label)
    ax.set(xlabel="step", ylabel="gradient variance", yscale="log",
           title="variance of the gradient per step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """Project ``(N, F)`` features on their first two principal components -> ``(N, 2)``."""
    centred = features - features.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def plot_embedding(model: nn.Module, source: DomainSplit, target: DomainSplit,
                   device: torch.device, path: Path, samples: int, seed: int,
                   target_context: int = 1) -> None:
    """PCA of penultimate features of ``samples`` test images per domain (source context 0,
    target ``target_context``), coloured by domain (left) and by class (right) (UAN paper,
    Fig. 2)."""
    gen = torch.Generator().manual_seed(seed)
    feats, labels, domains = [], [], []
    for d, split in enumerate((source, target)):
        idx = torch.randperm(len(split), generator=gen)[:samples]
        sub = DomainSplit(split.name, split.images[idx], split.labels[idx])
        _, f = predict(model, sub, target_context if d else 0, device)
        feats.append(f)
        labels.append(sub.labels)
        domains.append(torch.full((len(sub),), d))
    xy = pca_2d(torch.cat(feats).double()).float()
    lab, dom = torch.cat(labels), torch.cat(domains)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for d, (name, marker) in enumerate(((source.name, "o"), (target.name, "^"))):
        sel = dom == d
        axes[0].scatter(xy[sel, 0], xy[sel, 1], s=6, marker=marker, alpha=0.6,
                        label=f"{name} ({'source' if d == 0 else 'target'})")
        axes[1].scatter(xy[sel, 0], xy[sel, 1], s=6, marker=marker, c=lab[sel], cmap="tab10",
                        vmin=-0.5, vmax=9.5, alpha=0.6)
    axes[0].legend(markerscale=3)
    axes[0].set_title("features by domain")
    handles = [plt.Line2D([], [], ls="", marker="o", color=plt.cm.tab10(k), label=str(k))
               for k in range(int(lab.max()) + 1)]
    axes[1].legend(handles=handles, title="class", fontsize=7, ncol=2)
    axes[1].set_title("features by class (o source, ^ target)")
    for ax in axes:
        ax.set(xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    save_figure(fig, path)
