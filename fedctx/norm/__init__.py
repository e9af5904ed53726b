"""Normalization layers where a *context* selects statistics and affine parameters.

Public API: :func:`make_norm`, :func:`available`, :func:`norm_layer`, :func:`use_context`, and the
layer classes. See ``docs/norms.md``.
"""

from fedctx.norm.context import (
    ContextNorm,
    ContextNorm1d,
    ContextNorm2d,
    ContextNorm3d,
    context_batch_norm,
)
from fedctx.norm.factory import available, make_norm, norm_layer, register_norm
from fedctx.norm.routing import ContextAware, Contexts, use_context

__all__ = [
    "ContextAware",
    "ContextNorm",
    "ContextNorm1d",
    "ContextNorm2d",
    "ContextNorm3d",
    "Contexts",
    "available",
    "context_batch_norm",
    "make_norm",
    "norm_layer",
    "register_norm",
    "use_context",
]
