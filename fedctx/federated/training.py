"""Local training and evaluation loops, shared by Flower clients, the server and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedctx.data import ClientData
from fedctx.norm import use_context
from fedctx.optim import SGD

__all__ = ["evaluate", "local_train"]


def local_train(
    model: nn.Module,
    data: ClientData,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    device: torch.device | str = "cpu",
) -> float:
    """Train ``model`` in place with SGD on ``data`` for ``epochs``; return the mean train loss.

    Each mini-batch runs under the contexts of its samples (one int when they share one, which
    takes the fast single-context path of context norms). With ``proximal_mu > 0`` the FedProx
    term ``mu/2 * ||w - w_global||^2`` over trainable parameters is added (Li et al. 2020), with
    ``w_global`` the weights at the start of the call. Batches of one sample are dropped (batch
    statistics need two). Weight decay applies to conv and linear weights only
    (:func:`fedctx.optim.decayed_parameters`), never to normalization parameters or biases.
    """
    model.train()
    optimizer = SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    params = optimizer.params
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    x_all, y_all, c_all = data.x, data.y, data.contexts
    single = bool((c_all == c_all[0]).all()) if len(c_all) else True
    total, seen = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            ctx = int(c_all[0]) if single else c_all[idx].to(device)
            with use_context(model, ctx):
                loss = F.cross_entropy(model(x), y)
            if anchor is not None:
                prox = sum((p - a).square().sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: int, *,
             batch_size: int = 512, device: torch.device | str = "cpu") -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` (eval mode) on ``(x, y)`` under ``context``."""
    model.eval()
    correct, loss, n = 0, 0.0, len(y)
    with use_context(model, context):
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            logits = model(xb)
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return correct / max(n, 1), loss / max(n, 1)
