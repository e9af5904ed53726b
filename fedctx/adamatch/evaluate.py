"""Evaluation: eval-mode predictions and penultimate features with a given context."""

from __future__ import annotations

import torch
from torch import nn

from fedctx.adamatch.data import DomainSplit, normalize, to_float
from fedctx.norm import use_context


@torch.no_grad()
def predict(model: nn.Module, split: DomainSplit, context: int, device: torch.device,
            batch: int = 1000, memory_format: torch.memory_format = torch.contiguous_format
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits ``(N, K)`` and penultimate features ``(N, F)`` of ``split``, the images
    laid out in ``memory_format`` (the model's, e.g. ``torch.channels_last``).

    Features are the input of the model's last ``nn.Linear`` (captured with a forward hook).
    """
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    hook = last_linear.register_forward_hook(lambda m, inp, out: captured.append(inp[0].cpu()))
    was_training = model.training
    model.eval()
    logits = []
    try:
        with use_context(model, context):
            for start in range(0, len(split), batch):
                x = normalize(to_float(split.images[start:start + batch].to(device)), inplace=True)
                x = x.contiguous(memory_format=memory_format)
                logits.append(model(x).cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(logits), torch.cat(captured)


def accuracy(model: nn.Module, split: DomainSplit, context: int, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Top-1 accuracy of ``model`` on ``split`` with ``context``."""
    logits, _ = predict(model, split, context, device, memory_format=memory_format)
    return float((logits.argmax(1) == split.labels).float().mean())
