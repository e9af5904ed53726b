"""Context routing: tell every context-aware layer inside any model which context a batch uses.

A *context* selects the statistics and affine parameters a layer uses. It is either one ``int``
for the whole batch or a ``LongTensor[N]`` with one id per sample (a batch may mix contexts, as
in AdaMatch where source and target pass through the model together).

Routing does not change any model's ``forward`` signature: :func:`use_context` sets the context
on every :class:`ContextAware` module for the duration of a ``with`` block, so torchvision models
built with fedctx norm layers work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

Contexts = int | torch.Tensor


class ContextAware(nn.Module):
    """Base class of layers that keep one entry (statistics and/or affine) per context.

    Subclasses call :meth:`resolve_contexts` in ``forward`` to get the active context.
    """

    num_contexts: int

    def __init__(self, num_contexts: int) -> None:
        super().__init__()
        if not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be a positive int, got {num_contexts!r}")
        self.num_contexts = num_contexts
        self._active_contexts: Contexts | None = None

    def set_contexts(self, contexts: Contexts | None) -> None:
        """Set (or clear with ``None``) the context used by the next forward passes."""
        self._active_contexts = contexts

    def resolve_contexts(self, batch_size: int, device: torch.device) -> Contexts | None:
        """Return the active context for a batch of ``batch_size`` samples.

        Returns an ``int``, a ``LongTensor[N]`` on ``device``, or ``None`` when no context is set
        in evaluation mode (the layer then falls back to its context-agnostic rule). With a single
        context, no context is needed: it is 0.

        Raises:
            RuntimeError: no context set while training a layer with several contexts, a context
                id out of range, or a per-sample tensor whose length is not the batch size.
        """
        ctx = self._active_contexts
        if ctx is None:
            if self.num_contexts == 1:
                return 0
            if self.training:
                raise RuntimeError(
                    f"{type(self).__name__} has {self.num_contexts} contexts but no context was "
                    "set for this training batch; wrap the forward pass in "
                    "`with fedctx.norm.use_context(model, contexts): ...`"
                )
            return None
        if isinstance(ctx, int):
            if not 0 <= ctx < self.num_contexts:
                raise RuntimeError(
                    f"context id {ctx} is out of range for {type(self).__name__} with "
                    f"num_contexts={self.num_contexts} (valid ids: 0..{self.num_contexts - 1})"
                )
            return ctx
        ctx = ctx.to(device=device, dtype=torch.long)
        if ctx.dim() != 1 or ctx.numel() != batch_size:
            raise RuntimeError(
                f"per-sample contexts must be a LongTensor of shape [{batch_size}] (one id per "
                f"sample), got shape {tuple(ctx.shape)}"
            )
        if torch.compiler.is_compiling():
            return ctx  # a value check would force a graph break (host sync)
        if ctx.numel() and (int(ctx.min()) < 0 or int(ctx.max()) >= self.num_contexts):
            raise RuntimeError(
                f"context ids must lie in 0..{self.num_contexts - 1} for {type(self).__name__} "
                f"with num_contexts={self.num_contexts}; got ids in "
                f"{int(ctx.min())}..{int(ctx.max())}"
            )
        return ctx


@contextmanager
def use_context(model: nn.Module, contexts: Contexts | None) -> Iterator[nn.Module]:
    """Route ``contexts`` to every :class:`ContextAware` layer inside ``model``.

    Args:
        model: any ``nn.Module``; layers that are not context-aware are left alone.
        contexts: an ``int`` for the whole batch, a ``LongTensor[N]`` with one id per sample,
            or ``None`` to clear.

    The previous contexts are restored on exit, so blocks nest.
    """
    if isinstance(contexts, bool) or not (
        contexts is None or isinstance(contexts, int | torch.Tensor)
    ):
        raise TypeError(
            f"contexts must be an int, a LongTensor[N] or None, got {type(contexts).__name__}"
        )
    if isinstance(contexts, torch.Tensor) and contexts.dtype.is_floating_point:
        raise TypeError("per-sample contexts must be an integer tensor (torch.long)")
    layers = [m for m in model.modules() if isinstance(m, ContextAware)]
    previous = [m._active_contexts for m in layers]
    for m in layers:
        m.set_contexts(contexts)
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous, strict=True):
            m.set_contexts(prev)
