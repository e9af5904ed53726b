"""Normalization layers where a *context* selects statistics and affine parameters.

Public API: :func:`make_norm`, :func:`available`, :func:`norm_layer`, :func:`use_context`,
:func:`register_norm`, :func:`is_norm_module`, the layer classes, and their math as functions in
:mod:`fedctx.norm.functional`. See ``docs/norms.md``.
"""

from fedctx.norm import functional
from fedctx.norm.acn import AdaptiveContextNorm, SupervisedClusterNorm
from fedctx.norm.adain import ConditionalInstanceNorm
from fedctx.norm.batchgroup import BatchGroupNorm
from fedctx.norm.context import ContextNorm, ContextNorm1d, ContextNorm2d, ContextNorm3d
from fedctx.norm.convert import convert_norms
from fedctx.norm.crossiter import CrossIterationBatchNorm
from fedctx.norm.factory import (
    ACTIVATION_MODULES,
    NormAct,
    NormSpec,
    available,
    conv2d_class,
    is_norm_module,
    make_norm,
    make_norm_act,
    norm_layer,
    norm_spec,
    register_norm,
    train_defaults,
)
from fedctx.norm.functional import adaptive_context_norm, context_batch_norm
from fedctx.norm.ghost import GhostBatchNorm
from fedctx.norm.mixture import MixtureNorm, fit_gmm
from fedctx.norm.proxy import ProxyNorm
from fedctx.norm.routing import ContextAware, Contexts, use_context
from fedctx.norm.uan import (
    UnsupervisedAdaptiveNorm,
    unsupervised_adaptive_norm,
)
from fedctx.norm.weightstd import WSConv2d, WSGroupNorm, convert_ws_convs, standardize_weight

__all__ = [
    "ACTIVATION_MODULES",
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
    "NormAct",
    "NormSpec",
    "ProxyNorm",
    "SupervisedClusterNorm",
    "UnsupervisedAdaptiveNorm",
    "WSConv2d",
    "WSGroupNorm",
    "adaptive_context_norm",
    "available",
    "context_batch_norm",
    "conv2d_class",
    "convert_norms",
    "convert_ws_convs",
    "fit_gmm",
    "functional",
    "is_norm_module",
    "make_norm",
    "make_norm_act",
    "norm_layer",
    "norm_spec",
    "register_norm",
    "standardize_weight",
    "train_defaults",
    "unsupervised_adaptive_norm",
    "use_context",
]
