"""SGD for fedctx's training loops, with weight decay on conv and linear weights only.

One rule decides which tensors are decayed, for federated local training
(:func:`fedctx.federated.training.local_train`) and AdaMatch (:mod:`fedctx.adamatch.training`)
alike: :func:`decayed_parameters`, which selects by **module type**, never by tensor shape or
name. A ``dim() > 1`` rule would also decay the per-context ``gamma_k``/``beta_k`` of ``context``
norms, ACN's learned means and log-scales, UAN/SCB mixture parameters and AdaIN's affine tables,
all of which are ``(K, C)`` matrices; the AdaMatch authors decay only kernels (``'.w'`` variables
of conv and linear layers, ``wd * 0.5 * sum(w ** 2)`` in their objax code, whose gradient is the
``wd * w`` of PyTorch's coupled weight decay).

The update itself (:func:`sgd_step`, :class:`SGD`) is written out rather than taken from
``torch.optim``: the first use of ``torch.optim`` imports ``torch._dynamo`` (2.2 s measured on this
project's CPU machine), a cost every simulation worker process would pay at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedctx.norm import is_norm_module

#: Module types whose ``weight`` is a kernel (decayed); subclasses count (e.g. ``WSConv2d``).
KERNEL_MODULES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)


def decayed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors weight decay applies to: kernels of conv and linear layers.

    Selected: the ``weight`` of every ``nn.Conv*`` / ``nn.ConvTranspose*`` / ``nn.Linear`` /
    ``nn.Bilinear`` module (subclasses included, e.g. :class:`fedctx.norm.WSConv2d`), and the input
    projection of ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``, which are
    linear kernels stored on the attention module itself). Never selected: biases, embeddings and
    other free parameters, and anything owned by a normalization module or one of its sub-modules
    (:func:`fedctx.norm.is_norm_module`: ``torch.nn`` norms, classes declaring
    ``is_normalization`` and classes registered with ``register_norm``), even a linear layer
    inside a norm.

    Returns:
        The selected parameters, in ``model.named_modules()`` order, without duplicates.
    """
    norm_prefixes = [name for name, m in model.named_modules() if is_norm_module(m)]

    def inside_norm(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in norm_prefixes)

    selected: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if inside_norm(name):
            continue
        candidates: list[object] = []
        if isinstance(module, KERNEL_MODULES):
            candidates.append(getattr(module, "weight", None))
        elif isinstance(module, nn.MultiheadAttention):
            candidates += [module.in_proj_weight, module.q_proj_weight, module.k_proj_weight,
                           module.v_proj_weight]
        for p in candidates:
            if isinstance(p, nn.Parameter):
                selected.setdefault(id(p), p)
    return list(selected.values())


@torch.no_grad()
def sgd_step(params: Sequence[torch.Tensor], momentum_buffers: list[torch.Tensor | None], *,
             lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
             decay_mask: Sequence[bool] | None = None) -> None:
    """One step of SGD with momentum, the update of ``torch.optim.SGD`` (no dampening):
    ``d = g + wd * p`` (only where ``decay_mask`` is true; everywhere when it is ``None``);
    ``b = d`` on the first step, else ``b = momentum * b + d``; then ``p -= lr * b``, or with
    ``nesterov`` ``p -= lr * (d + momentum * b)``. Parameters without a gradient are skipped.

    Plain momentum is the update of the AdaMatch authors' ``objax.optimizer.Momentum`` (its
    default ``nesterov=False``); ``nesterov`` is FixMatch's TensorFlow code.
    """
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        decay = weight_decay if decay_mask is None or decay_mask[i] else 0.0
        d = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
        if momentum:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = d.detach().clone()
            else:
                buf.mul_(momentum).add_(d)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr)


class SGD:
    """SGD over the trainable parameters of ``model``, weight decay on
    :func:`decayed_parameters` only. ``lr`` may be changed between steps (schedules)."""

    def __init__(self, model: nn.Module, *, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        decayed = {id(p) for p in decayed_parameters(model)}
        self.decay_mask = [id(p) in decayed for p in self.params]
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.lr, self.momentum, self.weight_decay, self.nesterov = (
            lr, momentum, weight_decay, nesterov)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        sgd_step(self.params, self.momentum_buffers, lr=self.lr, momentum=self.momentum,
                 weight_decay=self.weight_decay, nesterov=self.nesterov,
                 decay_mask=self.decay_mask)
