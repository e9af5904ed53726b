"""Normalization layers where a *context* selects statistics and affine parameters.

Public API: :func:`make_norm`, :func:`available`, :func:`norm_layer`, :func:`use_context`, and the
layer classes. See ``docs/norms.md``.
"""

from fedctx.norm.acn import AdaptiveContextNorm, adaptive_context_norm
from fedctx.norm.adain import ConditionalInstanceNorm
from fedctx.norm.batchgroup import BatchGroupNorm
from fedctx.norm.context import (
    ContextNorm,
    ContextNorm1d,
    ContextNorm2d,
    ContextNorm3d,
    context_batch_norm,
)
from fedctx.norm.convert import convert_norms
from fedctx.norm.crossiter import CrossIterationBatchNorm
from fedctx.norm.factory import available, make_norm, norm_layer, register_norm
from fedctx.norm.ghost import GhostBatchNorm
from fedctx.norm.mixture import MixtureNorm, fit_gmm
from fedctx.norm.proxy import ProxyNorm
from fedctx.norm.routing import ContextAware, Contexts, use_context
from fedctx.norm.uan import (
    SupervisedClusterNorm,
    UnsupervisedAdaptiveNorm,
    unsupervised_adaptive_norm,
)
from fedctx.norm.weightstd import WSConv2d, WSGroupNorm, convert_ws_convs, standardize_weight

__all__ = [
    "AdaptiveContextNorm",
    "BatchGroupNorm",
    "ConditionalInstanceNorm",
    "ContextAware",
    "ContextNorm",
    "ContextNorm1d",
    "ContextNorm2d",
    "ContextNorm3d",
    "Contexts",
    "CrossIterationBatchNorm",
    "GhostBatchNorm",
    "MixtureNorm",
    "ProxyNorm",
    "SupervisedClusterNorm",
    "UnsupervisedAdaptiveNorm",
    "WSConv2d",
    "WSGroupNorm",
    "adaptive_context_norm",
    "available",
    "context_batch_norm",
    "convert_norms",
    "convert_ws_convs",
    "fit_gmm",
    "make_norm",
    "norm_layer",
    "register_norm",
    "standardize_weight",
    "unsupervised_adaptive_norm",
    "use_context",
]
