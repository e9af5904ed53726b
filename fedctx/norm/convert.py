"""Swap the BatchNorms of any model for fedctx norms (timm ``convert_splitbn_model``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedctx.norm.factory import make_norm

_DIMS: dict[type, int] = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _copy_into(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    """Copy ``src`` ``(C,)`` into ``dst`` ``(C,)``, ``(K, C)`` (every row) or a scalar counter."""
    if dst is None or src is None:
        return
    with torch.no_grad():
        if dst.shape[-1:] == src.shape[-1:] or src.dim() == 0:
            dst.copy_(src.to(dst.dtype).expand_as(dst))


def convert_norms(
    module: nn.Module, name: str, *, num_contexts: int = 1, **options: object
) -> nn.Module:
    """Recursively replace every BatchNorm of ``module`` by ``make_norm(name, C, ...)``.

    ``BatchNorm1d`` maps to ``dims=0`` (which also accepts ``(N, C, L)``), ``BatchNorm2d`` to 2,
    ``BatchNorm3d`` to 3 (``SyncBatchNorm``: 2). Parameters and buffers the new layer shares by
    name (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) are
    copied, into every context entry when they are per-context ``(K, C)``; the new layer is built
    on the old one's device and dtype (``device=``/``dtype=`` in ``options`` override) and put in
    its train/eval mode. Returns the converted module
    (the same object unless ``module`` itself is a BatchNorm), as timm's
    ``convert_splitbn_model``.
    """
    if isinstance(module, _BatchNorm):
        dims = _DIMS.get(type(module), 2)
        if not module.affine and "affine" not in options:
            options = {**options, "affine": False} if name in ("batch", "context") else options
        ref = module.weight if module.weight is not None else module.running_mean
        place = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = make_norm(name, module.num_features, dims=dims, num_contexts=num_contexts,
                        **{**place, **options})
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            _copy_into(getattr(new, attr, None), getattr(module, attr, None))
        new.train(module.training)
        return new
    for child_name, child in module.named_children():
        new_child = convert_norms(child, name, num_contexts=num_contexts, **options)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module
