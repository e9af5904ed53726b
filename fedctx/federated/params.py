"""Split a model's state into shared tensors and normalization tensors, by the owning module's
type (never by a substring of the name, which is how FedBN's code decides and how it breaks for
models that name their layers otherwise).

Normalization modules (:func:`fedctx.norm.is_norm_module`): ``torch.nn`` batch/instance/group/
layer/local-response norms, and every layer class defined in :mod:`fedctx.norm` except
convolutions and linear layers (e.g. ``WSConv2d``'s weight is a shared weight). Tensors of
sub-modules of a normalization module belong to it too.

Transient state is never model state: a module may declare buffers that only make sense inside
the process that trains it (``transient_buffers``, a class attribute; e.g. the cross-iteration
history of ``CrossIterationBatchNorm``). They must be registered non-persistent, so they are in
no ``state_dict`` and therefore in no role of the split: never sent, averaged or kept.
:func:`split_state` checks this and refuses a model whose declared transient buffer is
persistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedctx.norm import is_norm_module


@dataclass(frozen=True)
class StateSplit:
    """Names of a model's ``state_dict`` entries, by role.

    ``shared``: every tensor not owned by a normalization module.
    ``norm_affine``: learnable tensors of normalization modules (parameters).
    ``norm_stats``: non-learnable tensors of normalization modules (running statistics, counters).
    """

    shared: tuple[str, ...]
    norm_affine: tuple[str, ...]
    norm_stats: tuple[str, ...]

    @property
    def norm(self) -> tuple[str, ...]:
        return self.norm_affine + self.norm_stats


def transient_keys(model: nn.Module) -> tuple[str, ...]:
    """Names of the buffers ``model``'s modules declare transient (``transient_buffers``)."""
    keys = []
    for prefix, m in model.named_modules():
        for name in getattr(type(m), "transient_buffers", ()):
            keys.append(f"{prefix}.{name}" if prefix else name)
    return tuple(keys)


def split_state(model: nn.Module) -> StateSplit:
    """Classify every ``state_dict`` key of ``model`` as shared, norm affine or norm statistics.

    Raises:
        ValueError: a buffer declared transient (``transient_buffers``) is in the state dict
            (registered persistent), so it would be sent and aggregated.
    """
    state_keys = set(model.state_dict(keep_vars=True))
    leaked = [k for k in transient_keys(model) if k in state_keys]
    if leaked:
        raise ValueError(f"transient buffers {leaked[:3]} are in the state dict; register them "
                         "with persistent=False (they must not be aggregated across clients)")
    norm_prefixes = [name for name, m in model.named_modules() if is_norm_module(m)]
    param_names = {name for name, _ in model.named_parameters()}

    def owned_by_norm(key: str) -> bool:
        return any(p == "" or key.startswith(p + ".") for p in norm_prefixes)

    shared, affine, stats = [], [], []
    for key in model.state_dict(keep_vars=True):
        if not owned_by_norm(key):
            shared.append(key)
        elif key in param_names:
            affine.append(key)
        else:
            stats.append(key)
    return StateSplit(tuple(shared), tuple(affine), tuple(stats))


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]
                     ) -> dict[str, torch.Tensor]:
    """Example-weighted average of tensors with identical keys.

    Floating tensors: ``sum_i w_i x_i / sum_i w_i`` (computed in float64, cast back). Integer
    tensors (e.g. ``num_batches_tracked``) are never averaged as floats: the element-wise maximum
    is kept, in the original dtype.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.dtype.is_floating_point:
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc += s[key].to(torch.float64) * (w / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).amax(0)
    return out
