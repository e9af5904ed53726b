"""The math of every fedctx normalization layer as functions, in ``torch.nn.functional``'s shape.

The modules of :mod:`fedctx.norm` hold the state (parameters, running statistics, history),
check their input and call these functions, as ``torch.nn.BatchNorm2d`` calls
``F.batch_norm``. Running statistics passed in are updated in place when ``training``.

Inputs are ``(N, C, *spatial)``. Statistics are accumulated in float32 or wider
(:func:`fedctx.norm._common.stats_dtype`) and the output has the input's dtype.

Cost: every training-mode function here makes one pass over the input for its output, after
reductions that only read it, and its backward two fused passes (closed-form gradients in
:class:`torch.autograd.Function` s), where autograd through the composed ops made 6-15 passes
(measured in ``docs/results/norm_overhead.md``).

``uan_norm`` and ``mixture_norm`` live beside their layers (:mod:`fedctx.norm.uan`,
:mod:`fedctx.norm.mixture`) and are re-exported here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fedctx.norm._common import (
    fold_affine,
    group_counts,
    grouped_moments,
    momentum_update,
    stats_dtype,
)
from fedctx.norm.routing import Contexts

# --------------------------------------------------------------------------------------------
# kernels: closed-form backward passes


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_s a * b`` ``(N, C)`` of two ``(N, C, S)`` tensors: a batched dot product
    (``einsum``, nothing of their size written) when both are contiguous; else (views of
    channels-last tensors, where ``einsum`` would first copy both to ``(N, C, S)``) the product
    summed over ``S`` in their own layout."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.einsum("ncs,ncs->nc", a, b)
    return (a * b).sum(-1)


def _expand_channels(t: torch.Tensor, size: int) -> torch.Tensor:
    """``(K, R)`` per channel group -> ``(K, R * size)`` per channel."""
    return t if size == 1 else t.repeat_interleave(size, dim=1)


def _per_row(t: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Group values ``(K, C)`` -> per sample ``(N, C, 1)`` (``ids=None``: one group a sample;
    one group: ``(1, C, 1)``, broadcast)."""
    return (t if ids is None or t.shape[0] == 1 else t[ids]).unsqueeze(-1)


def _group_sum(rows: torch.Tensor, ids: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """Per-sample values ``(N, C)`` summed per group -> ``(K, C)``."""
    if ids is None:
        return rows
    if num_groups == 1:
        return rows.sum(0, keepdim=True)
    return rows.new_zeros(num_groups, rows.shape[1]).index_add(0, ids, rows)


def _grouped_forward(
    x: torch.Tensor,
    ids: torch.Tensor | None,
    num_groups: int,
    channel_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Forward of :class:`_GroupedBatchNorm`: ``(out, mean, var, inv_std, counts)``."""
    n, c = x.shape[:2]
    size = c // channel_groups
    rows = x if size == 1 else x.reshape(n, channel_groups, -1)
    mean, var, counts = grouped_moments(rows, ids, num_groups)
    inv_std = torch.rsqrt(var + eps)
    mean_c, inv_c = _expand_channels(mean, size), _expand_channels(inv_std, size)
    scale = inv_c if weight is None else inv_c * weight.to(inv_c.dtype)
    shift = -mean_c * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    out = torch.addcmul(_per_row(shift, ids), x.to(scale.dtype), _per_row(scale, ids))
    return out, mean, var, inv_std, counts


def _grouped_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor | None,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None,
    need_x: bool,
    out_scale: torch.Tensor | None = None,
    row_sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Backward of :class:`_GroupedBatchNorm` for the output gradient ``g * out_scale`` (a
    per-channel factor ``(C,)`` applied after the norm, folded in here instead of a pass).
    ``row_sums``: ``(sum_s g, sum_s g x)`` ``(N, C)`` when the caller has them; ``overwrite``:
    ``g`` is the caller's scratch, ``dx`` is written into it (no new buffer).

    Returns ``(grad_x or None, grad_weight, grad_bias)``, the last two ``(K, C)`` sums of
    ``g xhat`` and ``g`` per group, in the statistics dtype.
    """
    sd = mean.dtype
    g = g.to(sd)
    xs = x.to(sd)
    k, r = mean.shape
    c = x.shape[1]
    size = c // r
    row_g, row_gx = row_sums or (g.sum(-1), _row_dot(g, xs))
    sum_g, sum_gx = _group_sum(row_g, ids, k), _group_sum(row_gx, ids, k)
    if out_scale is not None:
        sum_g, sum_gx = sum_g * out_scale, sum_gx * out_scale
    mean_c, inv_c = _expand_channels(mean, size), _expand_channels(inv_std, size)
    sum_g_xhat = inv_c * (sum_gx - mean_c * sum_g)  # per channel: sum of g * xhat
    grad_x = None
    if need_x:
        w = None if weight is None else weight.to(sd)
        s1 = sum_g if w is None else w * sum_g  # sums of g w and g w xhat, per group
        s2 = sum_g_xhat if w is None else w * sum_g_xhat
        s1, s2 = s1.view(k, r, size).sum(-1), s2.view(k, r, size).sum(-1)
        m = (counts * (size * x.shape[-1])).clamp_min(1).unsqueeze(1)
        coef_x = _expand_channels(-inv_std.square() * s2 / m, size)
        const = _expand_channels(inv_std * (mean * inv_std * s2 - s1) / m, size)
        a = inv_c if w is None else inv_c * w
        if out_scale is not None:
            a = a * out_scale
        grad_x = torch.addcmul(_per_row(const, ids), g, _per_row(a, ids),
                               out=g if overwrite and g.dtype == x.dtype else None)
        grad_x.addcmul_(xs, _per_row(coef_x, ids))
        grad_x = grad_x.to(x.dtype)
    return grad_x, sum_g_xhat, sum_g


class _GroupedBatchNorm(torch.autograd.Function):
    """Batch norm of ``x`` ``(N, C, S)`` with statistics per sample group and channel group.

    Sample ``n`` belongs to sample group ``ids[n]`` (``K`` groups; ``ids=None``: ``K = N``, each
    sample its own group, nothing scattered or gathered); the ``C`` channels form ``R``
    consecutive channel groups. Group ``(k, r)`` is normalized with the mean and biased variance
    of its ``N_k * C / R * S`` values; the affine ``weight``/``bias`` are ``(K, C)`` (or ``None``).
    This is context batch norm (``R = C``, ``K`` contexts), ghost batch norm (``K`` ghost
    batches), instance norm (``K = N``), group norm (``K = N``, ``R = G``) and batch group norm
    (``K = 1``, ``R = G``).

    Forward: per-sample moments from two reductions (:func:`grouped_moments`), one ``addcmul``
    pass. Backward, per group (Ioffe & Szegedy 2015, eq. after Alg. 1):
    ``dx = rstd (g w - mean(g w) - xhat mean(g w xhat))`` as two fused passes over ``x``.
    Returns ``(out, mean, var)``, ``mean``/``var`` ``(K, R)`` (not differentiable).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        ids: torch.Tensor | None,
        num_groups: int,
        channel_groups: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, mean, var, inv_std, counts = _grouped_forward(
            x, ids, num_groups, channel_groups, weight, bias, eps
        )
        ctx.save_for_backward(x, mean, inv_std, counts, weight)
        ctx.ids = ids
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_out: torch.Tensor,
        _grad_mean: torch.Tensor | None,
        _grad_var: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, mean, inv_std, counts, weight = ctx.saved_tensors
        grad_x, sum_g_xhat, sum_g = _grouped_backward(
            grad_out, x, ctx.ids, mean, inv_std, counts, weight, ctx.needs_input_grad[0]
        )
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[4]:
            grad_w = sum_g_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_b = sum_g.to(grad_out.dtype if weight is None else weight.dtype)
        return grad_x, None, None, None, grad_w, grad_b, None


def grouped_batch_norm(
    x: torch.Tensor,
    ids: torch.Tensor | None,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    channel_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm with statistics per sample group ``ids`` and channel group (see
    :class:`_GroupedBatchNorm`).

    Args:
        x: ``(N, C, *spatial)``.
        ids: ``LongTensor[N]`` of sample-group ids in ``0..num_groups-1``, or ``None``: each
            sample its own group (``num_groups = N``).
        weight, bias: ``(num_groups, C)`` or ``None``.
        channel_groups: ``R`` dividing ``C`` (default ``C``: per-channel statistics).
    Returns:
        ``(out, mean, var)``: ``out`` shaped like ``x``; biased batch statistics
        ``(num_groups, R)`` (empty groups: 0 and 0).
    """
    n, c = x.shape[:2]
    out, mean, var = _GroupedBatchNorm.apply(
        x.reshape(n, c, -1), ids, num_groups, channel_groups or c, weight, bias, eps
    )
    return out.reshape(x.shape), mean, var


class _Affine(torch.autograd.Function):
    """``x * scale + shift`` for ``x`` ``(N, C, S)``, ``scale``/``shift`` ``(N, C)`` or ``(1, C)``.

    Backward in closed form: ``g * scale``, and the scale/shift gradients as reductions
    (:func:`_row_dot` and ``sum``). Twice differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        ctx.broadcast = (scale.shape[0] != x.shape[0], shift.shape[0] != x.shape[0])
        return torch.addcmul(shift.unsqueeze(-1), x, scale.unsqueeze(-1))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, scale = ctx.saved_tensors
        grad_x = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * scale.unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            grad_scale = _row_dot(grad_out, x)
            if ctx.broadcast[0]:
                grad_scale = grad_scale.sum(0, keepdim=True)
        if ctx.needs_input_grad[2]:
            grad_shift = grad_out.sum(-1)
            if ctx.broadcast[1]:
                grad_shift = grad_shift.sum(0, keepdim=True)
        return grad_x, grad_scale, grad_shift


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per sample and channel: ``x`` ``(N, C, *spatial)``, ``scale`` and
    ``shift`` ``(N, C)`` or ``(C,)``; computed in their dtype, returned in ``x``'s."""
    n, c = x.shape[:2]
    scale, shift = scale.reshape(-1, c), shift.reshape(-1, c)
    out = _Affine.apply(x.reshape(n, c, -1).to(scale.dtype), scale, shift)
    return out.to(x.dtype).reshape(x.shape)


def _gather(param: torch.Tensor | None, contexts: Contexts | None) -> torch.Tensor | None:
    """Rows of a per-context ``(K, C)`` parameter: ``(N, C)`` for per-sample contexts, ``(1, C)``
    for one context or none (the mean over contexts); a shared ``(C,)`` one as ``(1, C)``."""
    if param is None:
        return None
    if param.dim() == 1:
        return param.unsqueeze(0)
    if contexts is None:
        return param.mean(0, keepdim=True)
    if isinstance(contexts, int):
        return param[contexts].unsqueeze(0)
    return param[contexts]


def _per_sample(param: torch.Tensor | None, contexts: Contexts | None, n: int
                ) -> torch.Tensor | None:
    """:func:`_gather` expanded to ``(N, C)``."""
    rows = _gather(param, contexts)
    return None if rows is None else rows.expand(n, -1)


# --------------------------------------------------------------------------------------------
# context batch norm (Faye et al. 2024), ghost batch norm (Hoffer et al. 2017)


def _num_contexts(num_contexts: int | None, running_mean: torch.Tensor | None,
                  weight: torch.Tensor | None, ids: torch.Tensor) -> int:
    if num_contexts is not None:
        return num_contexts
    if running_mean is not None:
        return running_mean.shape[0]
    if weight is not None and weight.dim() == 2:
        return weight.shape[0]
    return int(ids.max()) + 1


@torch.no_grad()
def _unbiased(var: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Biased variance ``(K, R)`` of ``values`` ``(K,)`` values each -> unbiased."""
    values = values.unsqueeze(1)
    return var * values / (values - 1).clamp_min(1)


def context_batch_norm(
    x: torch.Tensor,
    contexts: Contexts | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    num_contexts: int | None = None,
    min_values: int = 2,
) -> torch.Tensor:
    """Context batch norm (Faye et al., arXiv:2405.17027): each context ``k`` normalized with its
    own batch statistics (training) or running statistics (evaluation), then its affine.

    Args:
        x: ``(N, C, *spatial)``.
        contexts: ``int`` (whole batch), ``LongTensor[N]`` (per sample) or ``None`` (eval only:
            mean of the per-context entries).
        running_mean, running_var: ``(K, C)`` or ``None`` (no running statistics); updated in
            place in training (unbiased variance), only for contexts with at least
            ``min_values`` values per channel in the batch; a context with fewer (default: one
            sample at a layer without spatial positions) is normalized with its running
            statistics.
        weight, bias: ``(K, C)`` per-context, ``(C,)`` shared, or ``None``.
        training: use batch statistics.
        num_contexts: ``K`` (inferred from the running statistics or ``weight`` if omitted).
        min_values: least values per channel for a context's batch statistics (``>= 2``;
            per-sample ``contexts`` only).
    Returns:
        Tensor shaped like ``x``.
    """
    use_batch_stats = training or running_mean is None
    if contexts is None:
        if use_batch_stats:
            raise RuntimeError("context_batch_norm needs contexts when using batch statistics")
        w, b = (None if p is None else _gather(p, None)[0] for p in (weight, bias))
        return F.batch_norm(
            x, running_mean.mean(0), running_var.mean(0), w, b, False, 0.0, eps
        )
    if isinstance(contexts, int):
        k = contexts
        w, b = (None if p is None else _gather(p, k)[0] for p in (weight, bias))
        return F.batch_norm(
            x,
            None if running_mean is None else running_mean[k],
            None if running_var is None else running_var[k],
            w, b, use_batch_stats, momentum, eps,
        )
    n, c = x.shape[:2]

    def with_running_stats() -> torch.Tensor:
        scale = torch.rsqrt(running_var[contexts] + eps)  # (N, C)
        scale, shift = fold_affine(scale, -running_mean[contexts] * scale,
                                   _gather(weight, contexts), _gather(bias, contexts))
        return channel_affine(x, scale, shift)

    if not use_batch_stats:
        return with_running_stats()
    k = _num_contexts(num_contexts, running_mean, weight, contexts)
    w, b = (None if p is None else p if p.dim() == 2 else p.expand(k, c) for p in (weight, bias))
    out, mean, var = grouped_batch_norm(x, contexts, k, w, b, eps)
    if running_mean is None:
        return out
    # A context with one value per channel in the batch (one sample at a layer without spatial
    # positions) has zero batch variance: normalizing by it erases the sample, and averaging it
    # into running_var drives that context's evaluation scale to 1/sqrt(eps) (this collapsed
    # clients holding several domains). Such contexts use, and leave unchanged, their running
    # statistics, as in evaluation (nn.BatchNorm refuses the case outright). min_values > 2
    # extends the rule to the few-sample contexts of mixed batches (see ContextNorm).
    values = group_counts(contexts, k, mean.dtype) * (x.numel() // (n * c))
    enough = values >= min_values  # training here: evaluation returned above
    momentum_update(running_mean, mean, momentum, where=enough.unsqueeze(1))
    momentum_update(running_var, _unbiased(var, values), momentum, where=enough.unsqueeze(1))
    lone = ~enough[contexts]
    if bool(lone.any()):
        out = torch.where(lone.view(n, *([1] * (x.dim() - 1))), with_running_stats(), out)
    return out


def ghost_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    virtual_batch_size: int,
    running_stats: str = "sequential",
) -> torch.Tensor:
    """Ghost batch norm (Hoffer et al., arXiv:1705.08741): in training, consecutive ghost batches
    of ``virtual_batch_size`` samples are normalized with their own statistics.

    ``running_stats="sequential"``: one momentum step per ghost batch in batch order (the
    authors' code), in closed form; ``"mean"``: one step with the mean of their statistics.
    ``N <= virtual_batch_size`` (or evaluation) is ``F.batch_norm``.
    """
    n, c = x.shape[:2]
    if not training or n <= virtual_batch_size:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    groups = -(-n // virtual_batch_size)
    ids = torch.arange(n, device=x.device) // virtual_batch_size
    w, b = (None if p is None else p.expand(groups, c) for p in (weight, bias))
    out, mean, var = grouped_batch_norm(x, ids, groups, w, b, eps)
    if running_mean is not None:
        with torch.no_grad():
            sizes = torch.bincount(ids, minlength=groups).to(var.dtype)
            unbiased = _unbiased(var, sizes * (x.numel() // (n * c)))
            if running_stats == "mean":
                momentum_update(running_mean, mean.mean(0), momentum)
                momentum_update(running_var, unbiased.mean(0), momentum)
            else:  # G sequential steps in closed form: weights m (1 - m)^(G - 1 - g)
                keep = 1.0 - momentum
                powers = torch.arange(groups - 1, -1, -1, device=x.device, dtype=var.dtype)
                steps = (momentum * keep ** powers).unsqueeze(1)  # (G, 1)
                for buf, stat in ((running_mean, mean), (running_var, unbiased)):
                    buf.copy_((keep ** groups * buf + (steps * stat).sum(0)).to(buf.dtype))
    return out


# --------------------------------------------------------------------------------------------
# batch group norm (Zhou et al. 2020), conditional instance norm (Dumoulin et al. 2017)


def batch_group_norm(
    x: torch.Tensor,
    num_groups: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Batch Group Normalization (Zhou et al., arXiv:2012.02782): ``num_groups`` groups of whole
    channels, each normalized over ``(N, C / G * spatial)``; per-channel ``weight``/``bias``
    ``(C,)``; running statistics ``(G,)``."""
    n, c = x.shape[:2]
    size = c // num_groups
    if training or running_mean is None:
        ids = torch.zeros(n, dtype=torch.long, device=x.device)
        w, b = (None if p is None else p.unsqueeze(0) for p in (weight, bias))
        out, mean, var = grouped_batch_norm(x, ids, 1, w, b, eps, channel_groups=num_groups)
        if training and running_mean is not None:
            values = torch.tensor([float(x.numel() // num_groups)], device=x.device)
            momentum_update(running_mean, mean[0], momentum)
            momentum_update(running_var, _unbiased(var, values)[0], momentum)
        return out
    sd = stats_dtype(x.dtype)
    scale = torch.rsqrt(running_var.to(sd) + eps).repeat_interleave(size)
    shift = -running_mean.to(sd).repeat_interleave(size) * scale
    scale, shift = fold_affine(scale, shift, weight, bias)
    return channel_affine(x, scale, shift)


def conditional_instance_norm(
    x: torch.Tensor,
    contexts: Contexts | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Conditional instance norm (Dumoulin et al., arXiv:1610.07629): each sample normalized over
    its spatial positions, then the affine of its context, ``weight``/``bias`` ``(K, C)``
    (``contexts=None``: their mean over contexts). Train and eval compute the same function."""
    n = x.shape[0]
    w, b = _per_sample(weight, contexts, n), _per_sample(bias, contexts, n)
    return grouped_batch_norm(x, None, n, w, b, eps)[0]


# --------------------------------------------------------------------------------------------
# adaptive context norm (Faye et al. 2024)


def adaptive_context_norm(
    x: torch.Tensor,
    contexts: Contexts | None,
    mean: torch.Tensor,
    log_scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Adaptive Context Normalization (Faye et al., arXiv:2409.04759):
    ``(x - mean[k]) / (exp(log_scale[k]) + eps) * weight[k] + bias[k]``, no batch statistics.

    Args:
        x: ``(N, C, *spatial)``.
        contexts: ``int``, ``LongTensor[N]`` or ``None`` (mean of the per-context entries).
        mean, log_scale, weight, bias: ``(K, C)`` (``weight``/``bias`` may be ``None``).
    """
    scale = 1.0 / (torch.exp(_gather(log_scale, contexts)) + eps)
    scale, shift = fold_affine(scale, -_gather(mean, contexts) * scale,
                               _gather(weight, contexts), _gather(bias, contexts))
    return channel_affine(x, scale, shift)


# --------------------------------------------------------------------------------------------
# cross-iteration batch norm (Yao et al. 2021), without the Taylor compensation


class _CrossIterationBatchNorm(torch.autograd.Function):
    """Training-mode cross-iteration batch norm of ``x`` ``(N, C, S)``.

    With the current batch's mean and biased variance ``mu, v`` and ``h`` valid history entries
    (means ``hm_j``, variances ``hv_j = max(hs_j - hm_j^2, 0)``, given as the sums
    ``hist_mean`` and ``hist_var`` and the squared deviations to the window mean), the window's
    statistics are ``mean = (mu + sum hm) / (1 + h)`` and, by the parallel-variance rule,
    ``var = (v + sum hv + (mu - mean)^2 + sum (hm - mean)^2) / (1 + h)``: the paper's
    ``mean(max(nu, mu^2)) - mean^2`` without its cancellation. Only ``mu, v`` are differentiated
    (``d var / d mu = 2 (mu - mean) / (1 + h)``). Returns ``(out, mu, v, mean, var)``, the last
    four ``(C,)`` and not differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        hist_mean: torch.Tensor,
        hist_sqmean: torch.Tensor,
        hist_valid: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        mu, v, _ = grouped_moments(x, torch.zeros(n, dtype=torch.long, device=x.device), 1)
        mu, v = mu[0], v[0]
        valid = hist_valid.to(mu.dtype).unsqueeze(1)  # (H, 1)
        hm, hs = hist_mean.to(mu.dtype), hist_sqmean.to(mu.dtype)
        count = 1 + valid.sum()
        mean = (mu + (valid * hm).sum(0)) / count
        hv = (hs - hm.square()).clamp_min(0)
        var = (v + (mu - mean).square()
               + (valid * (hv + (hm - mean).square())).sum(0)) / count
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(shift.dtype)
        out = torch.addcmul(shift.view(1, -1, 1), x.to(scale.dtype), scale.view(1, -1, 1))
        ctx.save_for_backward(x, weight, mu, mean, inv_std, count)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mu, v, mean, var)
        return out.to(x.dtype), mu, v, mean, var

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_out: torch.Tensor,
        *_grad_stats: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight, mu, mean, inv_std, count = ctx.saved_tensors
        sd = mu.dtype
        g = grad_out.to(sd)
        xs = x.to(sd)
        sum_g = g.sum((0, 2))  # dL/dshift
        sum_gx = _row_dot(g, xs).sum(0)  # dL/dscale
        w = None if weight is None else weight.to(sd)
        d_affine = sum_gx - mean * sum_g  # dL/d(inv_std * w) with shift = -mean * scale
        d_inv = d_affine if w is None else d_affine * w
        d_var_bar = -0.5 * inv_std.pow(3) * d_inv
        scale = inv_std if w is None else inv_std * w
        d_mean_bar = -scale * sum_g
        d_mu = (d_mean_bar + 2 * (mu - mean) * d_var_bar) / count
        d_v = d_var_bar / count
        m = x.shape[0] * x.shape[2]
        coef_x = 2 * d_v / m
        const = (d_mu - coef_x * mu * m) / m
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(const.view(1, -1, 1), g, scale.view(1, -1, 1))
            grad_x.addcmul_(xs, coef_x.view(1, -1, 1))
            grad_x = grad_x.to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (inv_std * d_affine).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sum_g.to(weight.dtype if weight is not None else grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def cross_iteration_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    hist_mean: torch.Tensor,
    hist_sqmean: torch.Tensor,
    hist_valid: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    use_history: bool = True,
    running_stats: str = "batch",
) -> torch.Tensor:
    """Cross-Iteration BatchNorm (Yao et al., arXiv:2002.05712) without the Taylor compensation.

    Args:
        x: ``(N, C, *spatial)``.
        running_mean, running_var: ``(C,)``, updated in place in training from the current
            batch (``running_stats="batch"``) or the window (``"window"``), unbiased variance.
        hist_mean, hist_sqmean, hist_valid: ``(H, C)``, ``(H, C)``, ``(H,)`` statistics
            (``E[x]``, ``E[x^2]``) of the previous iterations, newest first; in training they are
            rolled and the current batch's written first, in place (``H = 0``: no history).
        use_history: average with the valid history entries (``False``: plain batch norm, the
            history still recorded).
    """
    n, c = x.shape[:2]
    sd = stats_dtype(x.dtype)
    if not training:
        scale = torch.rsqrt(running_var.to(sd) + eps)
        scale, shift = fold_affine(scale, -running_mean.to(sd) * scale, weight, bias)
        return channel_affine(x, scale, shift)
    valid = hist_valid if use_history else torch.zeros_like(hist_valid)
    out, mu, v, mean, var = _CrossIterationBatchNorm.apply(
        x.reshape(n, c, -1), weight, bias, hist_mean, hist_sqmean, valid, eps
    )
    with torch.no_grad():
        if hist_valid.numel():
            for buf, value in ((hist_mean, mu), (hist_sqmean, v + mu.square()),
                               (hist_valid, True)):
                buf.copy_(torch.roll(buf, 1, 0))
                buf[0] = value
        m = x.numel() / c
        cur_mean, cur_var = (mu, v) if running_stats == "batch" else (mean, var)
        momentum_update(running_mean, cur_mean, momentum)
        momentum_update(running_var, cur_var * (m / max(m - 1, 1)), momentum)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# proxy norm (Labatie et al. 2021)

#: Activations a Proxy Norm can normalize (the output is ``phi(GN(x) * w + b)`` normalized).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def gaussian_quantiles(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` standard-normal quantiles at probabilities ``(i + 0.5) / n``."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2 * p - 1)).to(dtype)


def proxy_moments(
    activation: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    proxy_weight: torch.Tensor,
    proxy_bias: torch.Tensor,
    quantiles: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance ``(C,)`` of ``phi(gamma Yt + beta)``, ``Yt`` the proxy."""
    proxy = proxy_bias.unsqueeze(1) + (1 + proxy_weight).unsqueeze(1) * quantiles  # (C, n)
    act = activation(weight.unsqueeze(1) * proxy + bias.unsqueeze(1))
    var, mean = torch.var_mean(act, dim=1, correction=0)
    return mean, var


#: Positively homogeneous activations (``phi(u) = phi'(u) u``) and their slope below 0: applied
#: in place, their gradient read from the output (``u > 0`` exactly where the output exceeds the
#: proxy shift, the proxy scale being positive), so ``u`` is not kept, and ``sum g phi(u)`` comes
#: from the group norm's own sums.
_HOMOGENEOUS: dict[str, float] = {"relu": 0.0, "leaky_relu": 0.1, "identity": 1.0}
#: ``g * phi'(u)`` for the other activations (``torch``'s own backward kernels).
_ACTIVATION_GRADS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gelu": lambda g, u: torch.ops.aten.gelu_backward(g, u),
    "silu": lambda g, u: torch.ops.aten.silu_backward(g, u),
    "tanh": lambda g, u: torch.ops.aten.tanh_backward(g, torch.tanh(u)),
}


class _ProxyNorm(torch.autograd.Function):
    """``phi(GN(x) * w + b) * scale + shift`` for ``x`` ``(N, C, S)``: the group norm is
    :class:`_GroupedBatchNorm` with each sample its own group (``weight``/``bias`` ``(N, C)``),
    ``scale``/``shift`` ``(C,)`` the proxy normalization (their gradients flow on through
    :func:`proxy_moments` by autograd).

    Forward: moments, the ``u`` pass, the activation and the scaling in place (one buffer, as
    batch norm; other activations keep ``u``). Backward: ``g phi'(u)`` in one pass, then the
    group norm's two passes with ``scale`` folded in, written over ``g phi'(u)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        num_groups: int,
        weight: torch.Tensor,
        bias: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        eps: float,
        activation: str,
    ) -> torch.Tensor:
        n = x.shape[0]
        u, mean, _, inv_std, counts = _grouped_forward(x, None, n, num_groups, weight, bias, eps)
        slope = _HOMOGENEOUS.get(activation)
        if slope is None:
            out = ACTIVATIONS[activation](u)
        elif slope == 0.0:
            out = u.relu_()
        else:
            out = u if slope == 1.0 else F.leaky_relu_(u, slope)
        out = torch.addcmul(shift.view(1, -1, 1), out, scale.view(1, -1, 1), out=out)
        ctx.save_for_backward(x, mean, inv_std, counts, weight, bias, scale, shift,
                              out if slope is not None else u)
        ctx.activation = activation
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, mean, inv_std, counts, weight, bias, scale, shift, kept = ctx.saved_tensors
        activation = ctx.activation
        slope = _HOMOGENEOUS.get(activation)
        if slope is None:  # kept is u
            grad_u = _ACTIVATION_GRADS[activation](grad_out, kept)  # dL/du without the scale
        elif slope == 1.0:
            grad_u = grad_out
        else:  # kept is the output
            below = grad_out * slope if slope else 0.0
            grad_u = torch.where(kept > shift.view(1, -1, 1), grad_out, below)
        row_g = grad_u.sum(-1)
        row_gx = _row_dot(grad_u, x)
        if slope is not None:  # sum g phi(u) = sum (g phi'(u)) (x a + b), a, b per row
            size = x.shape[1] // mean.shape[1]
            a = _expand_channels(inv_std, size) * weight
            b = bias - _expand_channels(mean, size) * a
            grad_scale = (a * row_gx + b * row_g).sum(0)
        else:
            z = ACTIVATIONS[activation](kept)
            grad_scale = _row_dot(grad_out, z).sum(0)
        grad_shift = grad_out.sum((0, 2))
        grad_x, sum_g_xhat, sum_g = _grouped_backward(
            grad_u, x, None, mean, inv_std, counts, weight, ctx.needs_input_grad[0], scale,
            (row_g, row_gx), overwrite=grad_u is not grad_out,
        )
        return (grad_x, None, sum_g_xhat.to(weight.dtype), sum_g.to(weight.dtype), grad_scale,
                grad_shift, None, None)


def proxy_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    proxy_weight: torch.Tensor,
    proxy_bias: torch.Tensor,
    quantiles: torch.Tensor,
    activation: str = "relu",
    eps: float = 1e-5,
    proxy_eps: float = 0.03,
) -> torch.Tensor:
    """Proxy Normalization (Labatie et al., arXiv:2106.03743) of a GroupNorm -> affine ->
    activation pair: ``z = phi(GN(x) * weight + bias)`` normalized by the moments of ``phi`` on a
    Gaussian proxy ``N(proxy_bias, (1 + proxy_weight)^2)`` (``quantiles``: its standard-normal
    quantiles ``(n,)``), ``(z - E) / sqrt(Var + proxy_eps)``. All parameters ``(C,)``."""
    n, c = x.shape[:2]
    sd = stats_dtype(x.dtype)
    w, b = weight.to(sd), bias.to(sd)
    mean, var = proxy_moments(ACTIVATIONS[activation], w, b, proxy_weight.to(sd),
                              proxy_bias.to(sd), quantiles.to(sd))
    inv = torch.rsqrt(var + proxy_eps)
    out = _ProxyNorm.apply(x.reshape(n, c, -1).to(sd), num_groups, w.expand(n, c),
                           b.expand(n, c), inv, -mean * inv, eps, activation)
    return out.to(x.dtype).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# weight standardization (Qiao et al. 2019)


def standardize_weight(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-mean, unit-variance (biased) version of each output filter of ``weight``."""
    dims = list(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    return (weight - mean) * torch.rsqrt(var + eps)


# --------------------------------------------------------------------------------------------
# re-exports of the functions that live beside their layers (imported on first use: those
# modules may import this one)

_ELSEWHERE = {
    "uan_norm": "fedctx.norm.uan",
    "unsupervised_adaptive_norm": "fedctx.norm.uan",
    "mixture_norm": "fedctx.norm.mixture",
}


def __getattr__(name: str) -> object:
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "adaptive_context_norm",
    "batch_group_norm",
    "channel_affine",
    "conditional_instance_norm",
    "context_batch_norm",
    "cross_iteration_batch_norm",
    "gaussian_quantiles",
    "ghost_batch_norm",
    "grouped_batch_norm",
    "proxy_moments",
    "proxy_norm",
    "standardize_weight",
    *_ELSEWHERE,
]
