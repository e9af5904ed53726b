"""Pieces shared by the normalization layers.

Input checks, per-group moments, the affine step, running-statistics bookkeeping, and
:class:`BatchStatsNorm`, the base of the layers normalized with batch statistics in training and
running statistics in evaluation (in the manner of ``torch.nn.modules.batchnorm._NormBase``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn


def check_input(module: object, x: torch.Tensor, num_features: int, dims: tuple[int, ...]) -> None:
    """Raise ``ValueError`` when ``x`` is not ``(N, C, *spatial)`` with ``C == num_features``."""
    if x.dim() not in dims:
        raise ValueError(
            f"{type(module).__name__} expects a {' or '.join(map(str, dims))}-D input "
            f"(N, C, ...), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{type(module).__name__} has num_features={num_features} but the input has "
            f"{x.shape[1]} channels"
        )


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half/bfloat16, else unchanged."""
    return torch.promote_types(dtype, torch.float32)


def in_layout_of(out: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``out`` (``input``'s shape) laid out as ``input`` is: channels-last stays channels-last,
    as torch's own norms keep it (a model in channels-last would otherwise run its next
    pooling and convolution on the slower NCHW path, and copy back)."""
    for layout, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if (input.dim() == dims and not input.is_contiguous()
                and input.is_contiguous(memory_format=layout)):
            return out.contiguous(memory_format=layout)
    return out


def group_counts(ids: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Samples per group id as a ``(num_groups,)`` tensor (static shape, compile friendly)."""
    ones = torch.ones(ids.shape[0], dtype=dtype, device=ids.device)
    return torch.zeros(num_groups, dtype=dtype, device=ids.device).index_add_(0, ids, ones)


def grouped_moments(
    x: torch.Tensor, ids: torch.Tensor | None, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group, per-channel mean and biased variance of ``x`` ``(N, C, S)``.

    Sample ``n`` belongs to group ``ids[n]`` (``ids=None``: each sample is its own group,
    ``num_groups = N``, no scatter). Per-sample moments come from two fast reductions
    (``mean`` and the squared L2 norm, ``v_n = E[x^2] - m_n^2``, accumulated in float32 or wider),
    then are merged with the parallel-variance rule ``var_k = mean_n(v_n + (m_n - mean_k)^2)``,
    so cancellation only happens within one sample-channel row (relative error about
    ``(m_n / sd_n)^2 * 1e-7`` in float32; ``torch.var_mean`` is 30x slower on CPU).

    Returns:
        ``(mean, var, counts)``: ``(G, C)``, ``(G, C)`` and samples per group ``(G,)``.
        Empty groups get mean 0 and variance 0.
    """
    sd = stats_dtype(x.dtype)
    xs = x.to(sd)
    m_n = xs.mean(-1)  # (N, C)
    v_n = (torch.linalg.vector_norm(xs, dim=-1).square() / x.shape[-1] - m_n.square()).clamp_min(0)
    if ids is None:
        return m_n, v_n, m_n.new_ones(x.shape[0])
    if num_groups == 1:  # a mean over samples (index_add is slow on wide rows on CPU)
        mean = m_n.mean(0, keepdim=True)
        var = (v_n + (m_n - mean).square()).mean(0, keepdim=True)
        return mean, var, m_n.new_full((1,), x.shape[0])
    counts = group_counts(ids, num_groups, sd)
    denom = counts.clamp_min(1).unsqueeze(1)
    zeros = m_n.new_zeros(num_groups, x.shape[1])
    mean = zeros.index_add(0, ids, m_n) / denom
    var = zeros.index_add(0, ids, v_n + (m_n - mean[ids]).square()) / denom
    return mean, var, counts


#: Least channels per group of the default group count for ``(N, C)`` features (``dims=0``):
#: without spatial positions a group's statistics are over its ``C / G`` values only, and
#: GroupNorm's 32 groups would normalize a 64-feature layer in pairs (each pair becomes
#: ``(+1, -1)`` up to the affine: the layer keeps one sign per pair and cannot learn).
MIN_FLAT_GROUP_SIZE = 16


def default_groups(num_features: int, wanted: int = 32, dims: int = 2) -> int:
    """GroupNorm's default group count here.

    The largest divisor of ``num_features`` that is ``<= wanted`` (Wu & He 2018: 32 groups);
    for ``(N, C)`` features (``dims=0``) also at most ``num_features // MIN_FLAT_GROUP_SIZE``
    (at least 16 values per group; a layer of fewer than 32 features gets one group, LayerNorm).
    """
    limit = min(wanted, num_features)
    if dims == 0:
        limit = max(1, min(limit, num_features // MIN_FLAT_GROUP_SIZE))
    return max(g for g in range(1, limit + 1) if num_features % g == 0)


def resolve_groups(num_features: int, num_groups: int | None, dims: int = 2) -> int:
    """``num_groups`` (``None``: :func:`default_groups` for ``dims``), checked to divide
    ``num_features``."""
    if num_groups is None:
        num_groups = default_groups(num_features, dims=dims)
    if not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must divide num_features={num_features}")
    return num_groups


def init_affine(
    module: nn.Module, affine: bool, shape: tuple[int, ...], device: Any = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Register ``weight`` (ones) and ``bias`` (zeros) of ``shape``, or both as ``None``."""
    if affine:
        module.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        module.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    """Set ``module.weight`` to ones and ``module.bias`` to zeros (those that are not ``None``)."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_running_stats(
    module: nn.Module,
    shape: tuple[int, ...] | None,
    counter_shape: tuple[int, ...] = (),
    extra: Mapping[str, torch.Tensor] | None = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Register the running-statistics buffers, in ``state_dict`` order.

    ``running_mean`` (zeros) and ``running_var`` (ones) of ``shape``, then the ``extra`` buffers,
    then ``num_batches_tracked`` (long zeros of ``counter_shape``), on ``device``; the statistics
    in ``dtype``. With ``shape=None`` the three standard buffers are registered as ``None`` (no
    running statistics).
    """
    if shape is None:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            module.register_buffer(name, None)
        return
    module.register_buffer("running_mean", torch.zeros(shape, device=device, dtype=dtype))
    module.register_buffer("running_var", torch.ones(shape, device=device, dtype=dtype))
    for name, value in (extra or {}).items():
        module.register_buffer(name, value)
    module.register_buffer(
        "num_batches_tracked", torch.zeros(counter_shape, dtype=torch.long, device=device)
    )


def reset_running_stats(module: nn.Module) -> None:
    """Running mean 0, running variance 1, no batches tracked (nothing when they are ``None``)."""
    if module.running_mean is not None:
        module.running_mean.zero_()
        module.running_var.fill_(1.0)
        module.num_batches_tracked.zero_()


@torch.no_grad()
def momentum_update(
    buffer: torch.Tensor, value: torch.Tensor, momentum: float, where: torch.Tensor | None = None
) -> None:
    """``buffer <- lerp(buffer, value, momentum)`` in place (PyTorch's momentum convention).

    ``value`` is cast to the buffer's dtype; with a boolean ``where`` only those entries move.
    """
    value = value.to(buffer.dtype)
    if where is None:
        buffer.lerp_(value, momentum)
    else:
        buffer.copy_(torch.where(where, torch.lerp(buffer, value, momentum), buffer))


def fold_affine(
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``y * weight + bias`` into the normalization ``y = x * scale + shift``."""
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    return scale, shift


def apply_affine(
    y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """Per-channel ``y * weight + bias`` for ``y`` ``(N, C, *spatial)`` and ``(C,)`` parameters."""
    view = (-1,) + (1,) * (y.dim() - 2)
    if weight is not None and bias is not None:
        return torch.addcmul(bias.view(view), y, weight.view(view))
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y


def describe(module: nn.Module, *fields: str) -> str:
    """``extra_repr`` text: ``num_features``, then ``name=value`` per field (strings quoted)."""
    parts = [str(module.num_features)]
    for name in fields:
        value = getattr(module, name)
        parts.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
    return ", ".join(parts)


class BatchStatsNorm(nn.Module):
    """Base of the layers normalized with batch statistics, and with running ones in evaluation.

    Holds ``num_features``, ``eps``, ``momentum`` and ``affine`` as ``nn.BatchNorm`` does, the
    per-channel ``weight``/``bias`` ``(C,)`` (or ``None``), and the buffers ``running_mean``
    (zeros), ``running_var`` (ones) of ``stats_shape`` (default ``(C,)``), any ``extra_stats``
    and ``num_batches_tracked``. Subclasses register further state after ``__init__`` and extend
    :meth:`reset_running_stats` for it.

    Args:
        num_features: channels ``C``.
        eps, momentum, affine: as in ``nn.BatchNorm``.
        stats_shape: shape of ``running_mean`` and ``running_var``.
        extra_stats: further running buffers, registered after ``running_var``.
        device, dtype: of the parameters and buffers, as in ``torch.nn``.
    """

    #: Normalization state (see :func:`fedctx.norm.is_norm_module`).
    is_normalization: ClassVar[bool] = True
    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float,
        affine: bool,
        stats_shape: tuple[int, ...] | None = None,
        extra_stats: Mapping[str, torch.Tensor] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        init_affine(self, affine, (num_features,), device, dtype)
        init_running_stats(self, stats_shape or (num_features,), extra=extra_stats,
                           device=device, dtype=dtype)

    def reset_running_stats(self) -> None:
        reset_running_stats(self)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)
