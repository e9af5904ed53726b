"""Local training and evaluation loops, shared by Flower clients, the server and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedctx.data import ClientData
from fedctx.norm import use_context
from fedctx.optim import SGD

__all__ = ["BatchLoss", "context_picker", "evaluate", "local_train", "sgd_epochs"]

#: The loss of one mini-batch, given its sample indices ``(B,)`` into the client's data.
BatchLoss = Callable[[torch.Tensor], torch.Tensor]


def context_picker(contexts: torch.Tensor, device: torch.device | str
                   ) -> Callable[[torch.Tensor], int | torch.Tensor]:
    """``idx -> `` the context of the samples ``idx`` of a client whose samples have
    ``contexts``: one int when they are all equal (the fast single-context path of context
    norms), else their ``(B,)`` ids on ``device``."""
    if not len(contexts) or bool((contexts == contexts[0]).all()):
        one = int(contexts[0]) if len(contexts) else 0
        return lambda idx: one
    return lambda idx: contexts[idx].to(device)


def sgd_epochs(
    model: nn.Module,
    num_samples: int,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> float:
    """Train ``model`` in place with SGD for ``epochs`` over ``num_samples`` samples in random
    mini-batches, minimising ``batch_loss(idx)``; return the mean loss per sample.

    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_global||^2`` over trainable
    parameters is added (Li et al. 2020), with ``w_global`` the weights at the start of the call.
    Batches of one sample are dropped (batch statistics need two). Weight decay applies to conv
    and linear weights only (:func:`fedctx.optim.decayed_parameters`), never to normalization
    parameters or biases.
    """
    model.train()
    optimizer = SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    params = optimizer.params
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    total, seen = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = batch_loss(idx)
            if anchor is not None:
                prox = sum((p - a).square().sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


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
    """Supervised training of ``model`` on labelled ``data`` (cross-entropy, :func:`sgd_epochs`);
    return the mean train loss.

    Each mini-batch runs under the contexts of its samples (:func:`context_picker`).
    """
    x_all, y_all = data.x, data.y
    context = context_picker(data.contexts, device)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        with use_context(model, context(idx)):
            return F.cross_entropy(model(x_all[idx].to(device)), y_all[idx].to(device))

    return sgd_epochs(model, len(x_all), batch_loss, epochs=epochs, batch_size=batch_size, lr=lr,
                      momentum=momentum, weight_decay=weight_decay, generator=generator,
                      proximal_mu=proximal_mu)


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
