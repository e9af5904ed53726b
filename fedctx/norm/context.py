"""Context Normalization (Supervised Batch Normalization, SBN).

Faye et al., "Context Normalization Layer with Applications", arXiv:2405.17027 (SBN / CN).
Each context *k* has its own running mean and variance and (by default) its own affine
parameters. In training, the samples of context *k* are normalized with the mean and (biased)
variance of the context-*k* samples of the batch, taken over ``N_k * prod(spatial)`` values per
channel::

    y_i = gamma_k * (x_i - mu_k) / sqrt(var_k + eps) + beta_k,    k = context(i)

Running statistics follow ``torch.nn.BatchNorm`` (momentum convention of PyTorch, unbiased
variance in the running estimate), per context, updated only for contexts present in the batch.

Choices where the paper leaves a detail open (each tested):

* Defaults mirror ``nn.BatchNorm`` (``eps=1e-5``, ``momentum=0.1``), so ``num_contexts=1``
  reproduces ``nn.BatchNorm`` exactly. The authors' Keras defaults are ``eps=1e-3`` and
  momentum 0.99 in Keras' convention (= ``momentum=0.01`` here); pass them to match.
* The authors' code divides by ``sqrt(p_k)`` (a per-context prior); ``gamma_k`` absorbs that
  constant, so it is not a separate parameter here.
* Evaluation with no context set uses the mean over contexts of the running statistics and
  affine parameters (the paper's rule for an unknown context).

The mixed-batch path has no Python loop over contexts: per-sample moments (two fast
reductions, see :func:`fedctx.norm._common.grouped_moments`) are merged per context with
``index_add`` and gathered back per sample; its backward is written in closed form
(:class:`_MixedContextBatchNorm`). A single ``int`` context calls ``F.batch_norm`` directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fedctx.norm._common import (
    check_input,
    describe,
    fold_affine,
    group_counts,
    grouped_moments,
    init_affine,
    init_running_stats,
    momentum_update,
    reset_affine,
    reset_running_stats,
)
from fedctx.norm.routing import ContextAware, Contexts


def _gather_affine(param: torch.Tensor | None, ctx: torch.Tensor) -> torch.Tensor | None:
    if param is None:
        return None
    return param[ctx] if param.dim() == 2 else param.unsqueeze(0).expand(ctx.numel(), -1)


def _select_affine(param: torch.Tensor | None, k: int) -> torch.Tensor | None:
    if param is None:
        return None
    return param[k] if param.dim() == 2 else param


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
) -> torch.Tensor:
    """Functional context batch norm.

    Args:
        x: ``(N, C, *spatial)``.
        contexts: ``int`` (whole batch), ``LongTensor[N]`` (per sample) or ``None`` (eval only:
            mean of the per-context entries).
        running_mean, running_var: ``(K, C)`` or ``None`` (no running statistics).
        weight, bias: ``(K, C)`` per-context, ``(C,)`` shared, or ``None``.
        training: use batch statistics (and update the running ones in place).
        num_contexts: ``K`` (inferred from the running statistics or ``weight`` if omitted).
    Returns:
        Tensor shaped like ``x``.
    """
    use_batch_stats = training or running_mean is None
    if contexts is None:
        if use_batch_stats:
            raise RuntimeError("context_batch_norm needs contexts when using batch statistics")
        w = weight.mean(0) if weight is not None and weight.dim() == 2 else weight
        b = bias.mean(0) if bias is not None and bias.dim() == 2 else bias
        return F.batch_norm(
            x, running_mean.mean(0), running_var.mean(0), w, b, False, 0.0, eps
        )
    if isinstance(contexts, int):
        k = contexts
        return F.batch_norm(
            x,
            None if running_mean is None else running_mean[k],
            None if running_var is None else running_var[k],
            _select_affine(weight, k),
            _select_affine(bias, k),
            use_batch_stats,
            momentum,
            eps,
        )
    return _mixed_context_batch_norm(
        x, contexts, running_mean, running_var, weight, bias, use_batch_stats, training,
        momentum, eps, num_contexts,
    )


class _MixedContextBatchNorm(torch.autograd.Function):
    """Training-mode context batch norm of ``(N, C, S)`` with per-sample context ids.

    Forward: two fast reductions for per-sample moments, merged per context, then one
    ``addcmul`` pass. Backward: the batch-norm gradient per context group in closed form,
    ``dx = gamma r (g - mean_k(g) - xhat mean_k(g xhat))``, as two fused passes, so the layer costs
    about what ``nn.BatchNorm`` costs. Returns ``(out, mean, var)`` with ``mean``, ``var`` the
    ``(K, C)`` biased batch statistics (not differentiable outputs).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        ids: torch.Tensor,
        num_contexts: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, var, counts = grouped_moments(x, ids, num_contexts)
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(shift.dtype)
        out = torch.addcmul(shift[ids].unsqueeze(-1), x.to(scale.dtype), scale[ids].unsqueeze(-1))
        ctx.save_for_backward(x, ids, mean, inv_std, counts, weight)
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
        x, ids, mean, inv_std, counts, weight = ctx.saved_tensors
        sd = mean.dtype
        g = grad_out.to(sd)
        xs = x.to(sd)
        k, c = mean.shape
        zeros = mean.new_zeros(k, c)
        sum_g = zeros.index_add(0, ids, g.sum(-1))
        sum_gx = zeros.index_add(0, ids, torch.einsum("ncs,ncs->nc", g, xs))
        sum_g_xhat = inv_std * (sum_gx - mean * sum_g)  # sum over the group of g * xhat
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            m = (counts * x.shape[-1]).clamp_min(1).unsqueeze(1)
            a = inv_std if weight is None else inv_std * weight.to(sd)
            coef_x = -a * inv_std * sum_g_xhat / m
            const = a * (mean * inv_std * sum_g_xhat - sum_g) / m
            grad_x = torch.addcmul(const[ids].unsqueeze(-1), g, a[ids].unsqueeze(-1))
            grad_x.addcmul_(xs, coef_x[ids].unsqueeze(-1))
            grad_x = grad_x.to(x.dtype)
        if weight is not None and ctx.needs_input_grad[3]:
            grad_w = sum_g_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = sum_g.to(grad_out.dtype if weight is None else weight.dtype)
        return grad_x, None, None, grad_w, grad_b, None


def _mixed_context_batch_norm(
    x: torch.Tensor,
    ctx: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    use_batch_stats: bool,
    update_running: bool,
    momentum: float,
    eps: float,
    num_contexts: int | None = None,
) -> torch.Tensor:
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    if use_batch_stats:
        k = (num_contexts if num_contexts is not None
             else running_mean.shape[0] if running_mean is not None
             else weight.shape[0] if weight is not None and weight.dim() == 2
             else int(ctx.max()) + 1)
        w = None if weight is None else weight if weight.dim() == 2 else weight.expand(k, c)
        b = None if bias is None else bias if bias.dim() == 2 else bias.expand(k, c)
        out, mean, var = _MixedContextBatchNorm.apply(xf, ctx, k, w, b, eps)
        if update_running and running_mean is not None:
            with torch.no_grad():
                counts = group_counts(ctx, k, mean.dtype)
                present = (counts > 0).unsqueeze(1)
                n_k = (counts * xf.shape[-1]).unsqueeze(1)
                unbiased = var * n_k / (n_k - 1).clamp_min(1)
                momentum_update(running_mean, mean, momentum, where=present)
                momentum_update(running_var, unbiased, momentum, where=present)
        return out.reshape(x.shape)
    scale = torch.rsqrt(running_var[ctx] + eps)  # (N, C)
    scale, shift = fold_affine(
        scale, -running_mean[ctx] * scale, _gather_affine(weight, ctx), _gather_affine(bias, ctx)
    )
    out = torch.addcmul(shift.unsqueeze(-1), xf.to(scale.dtype), scale.unsqueeze(-1))
    return out.to(x.dtype).reshape(x.shape)


class ContextNorm(ContextAware):
    """Context batch normalization over ``(N, C, *spatial)`` inputs.

    Args:
        num_features: channels ``C``.
        num_contexts: number of contexts ``K``.
        eps, momentum: as in ``nn.BatchNorm`` (PyTorch's momentum convention).
        affine: learn per-context ``gamma_k, beta_k`` (shape ``(K, C)``).
        shared_affine: one ``gamma, beta`` (shape ``(C,)``) shared by all contexts instead.
        track_running_stats: keep per-context running statistics ``(K, C)`` for evaluation.

    Shapes: input and output ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``
    (subclasses fix the rank). Contexts come from :func:`fedctx.norm.use_context`.
    """

    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        num_contexts: int = 1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        shared_affine: bool = False,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_contexts)
        if not isinstance(momentum, float | int) or not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = float(momentum)
        self.affine = affine
        self.shared_affine = shared_affine
        self.track_running_stats = track_running_stats
        stats_shape = (num_contexts, num_features)
        init_affine(self, affine, (num_features,) if shared_affine else stats_shape)
        init_running_stats(self, stats_shape if track_running_stats else None, (num_contexts,))

    def reset_running_stats(self) -> None:
        reset_running_stats(self)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        ctx = self.resolve_contexts(x.shape[0], x.device)
        if self.training and self.track_running_stats and ctx is not None:
            with torch.no_grad():
                if isinstance(ctx, int):
                    self.num_batches_tracked[ctx] += 1
                else:
                    present = group_counts(ctx, self.num_contexts, torch.float32) > 0
                    self.num_batches_tracked.add_(present.long())
        return context_batch_norm(
            x, ctx, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps, self.num_contexts,
        )

    def extra_repr(self) -> str:
        return describe(
            self, "num_contexts", "eps", "momentum", "affine", "shared_affine",
            "track_running_stats",
        )


class ContextNorm1d(ContextNorm):
    """:class:`ContextNorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    expected_dims = (2, 3)


class ContextNorm2d(ContextNorm):
    """:class:`ContextNorm` for ``(N, C, H, W)`` inputs."""

    expected_dims = (4,)


class ContextNorm3d(ContextNorm):
    """:class:`ContextNorm` for ``(N, C, D, H, W)`` inputs."""

    expected_dims = (5,)
