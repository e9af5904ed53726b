"""The pieces of AdaMatch as small pure functions.

Berthelot, Roelofs, Sohn, Carlini, Kurakin, "AdaMatch: A Unified Approach to Semi-Supervised
Learning and Domain Adaptation", ICLR 2022 (arXiv:2106.04732), and the authors' JAX/objax code
(google-research/adamatch). Notation: ``n_s`` source samples, ``n_t`` target samples, ``K``
classes. Every function here is side-effect free except :func:`ema_update_` and
:func:`restore_buffers_` (named with ``_`` because they write in place).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def interpolate_logits(
    joint: torch.Tensor, source_only: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Random logit interpolation (paper Sec. 3.2, Eq. 1).

    ``Z_S = lam * Z'_S + (1 - lam) * Z''_S`` written as ``joint + lam * (source_only - joint)``.

    Args:
        joint: ``(n_s, K)`` source logits from the pass over the concatenated source+target batch.
        source_only: ``(n_s, K)`` source logits from the pass over the source batch alone.
        lam: ``(n_s, K)`` weights, one ``U(0, 1)`` draw per logit in training.
    Returns:
        ``(n_s, K)`` interpolated source logits.
    """
    return joint + lam * (source_only - joint)


def align_distribution(
    probs_target: torch.Tensor, p_source: torch.Tensor, p_target: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Distribution alignment (paper Sec. 3.3): rescale target predictions by ``p_s / p_t``.

    ``p~ = normalize_L1(p_target_weak * (p_s + eps) / (p_t + eps))``, without gradient.

    Args:
        probs_target: ``(n_t, K)`` softmax of the target weak logits.
        p_source: ``(K,)`` running estimate of the source label distribution.
        p_target: ``(K,)`` running estimate of the mean target prediction.
    Returns:
        ``(n_t, K)`` aligned pseudo-label distributions (rows sum to 1), detached.
    """
    aligned = probs_target.detach() * (p_source + eps) / (p_target + eps)
    return aligned / aligned.sum(dim=1, keepdim=True)


def mean_confidence(probs: torch.Tensor) -> torch.Tensor:
    """``mean_i max_k p[i, k]``: the mean top-class probability of ``(n, K)`` ``probs``, detached
    (a scalar tensor)."""
    return probs.detach().max(dim=1).values.mean()


def relative_threshold(probs_source: torch.Tensor, tau: float) -> torch.Tensor:
    """Relative confidence threshold (paper Sec. 3.4): ``c_tau = tau * mean_i max_k p_s[i, k]``.

    Args:
        probs_source: ``(n_s, K)`` softmax of the (interpolated) source weak logits.
        tau: the ratio, 0.9 in the paper.
    Returns:
        A scalar tensor, detached.
    """
    return tau * mean_confidence(probs_source)


def pseudo_label_mask(aligned: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``mask_i = 1[max_k p~[i, k] >= c_tau]`` as a float ``(n_t,)`` tensor."""
    return (aligned.max(dim=1).values >= threshold).float()


def warmup_weight(step: int, total_steps: int) -> float:
    """Target-loss weight ``mu(t) = 1/2 - cos(min(pi, 2 pi t / T)) / 2`` (paper Sec. 3.5).

    Rises from 0 to 1 over the first half of training, then stays at 1.
    """
    return 0.5 - math.cos(min(math.pi, 2.0 * math.pi * step / max(1, total_steps))) / 2.0


def cosine_lr(step: int, total_steps: int, base_lr: float, final_ratio: float = 0.25) -> float:
    """``lr(t) = base_lr * cos(arccos(final_ratio) * t / T)``: decays to ``final_ratio * base_lr``.

    With ``final_ratio = 0.25`` this is the schedule of the authors' code (PAPERS.md).
    """
    return base_lr * math.cos(math.acos(final_ratio) * step / max(1, total_steps))


def update_ema_vector(running: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """Exponential moving average ``decay * running + (1 - decay) * value`` (a new tensor)."""
    return decay * running + (1.0 - decay) * value.detach()


def update_moving_average(
    history: torch.Tensor, value: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving average over a ring buffer, as ``objax.nn.MovingAverage`` (the authors' ``p_t``).

    Args:
        history: ``(B, K)`` the last ``B`` values (initialised to ``1/K``).
        value: ``(K,)`` the newest value; it replaces row ``step % B``.
        step: index of this update.
    Returns:
        The new history ``(B, K)`` and its mean over rows ``(K,)``.
    """
    history = history.clone()
    history[step % history.shape[0]] = value.detach()
    return history, history.mean(dim=0)


def adamatch_loss(
    source_weak_logits: torch.Tensor,
    source_strong_logits: torch.Tensor,
    target_strong_logits: torch.Tensor,
    labels: torch.Tensor,
    aligned: torch.Tensor,
    mask: torch.Tensor,
    target_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdaMatch objective without weight decay (paper Eq. 6).

    ``L = (CE(src weak) + CE(src strong)) / 2 + mu(t) * mean_i(mask_i * CE(tgt strong_i, argmax
    p~_i))`` (hard pseudo-labels, as in the paper; the Keras example uses soft targets).

    Args:
        source_weak_logits, source_strong_logits: ``(n_s, K)`` interpolated source logits.
        target_strong_logits: ``(n_t, K)``.
        labels: ``(n_s,)`` source labels.
        aligned: ``(n_t, K)`` aligned target pseudo-label distributions.
        mask: ``(n_t,)`` 0/1 confidence mask.
        target_weight: ``mu(t)``.
    Returns:
        ``(total, source_loss, target_loss)`` scalars.
    """
    source_loss = 0.5 * (
        F.cross_entropy(source_weak_logits, labels) + F.cross_entropy(source_strong_logits, labels)
    )
    target_loss = pseudo_label_loss(target_strong_logits, aligned, mask)
    return source_loss + target_weight * target_loss, source_loss, target_loss


def pseudo_label_loss(target_strong_logits: torch.Tensor, aligned: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """The unlabelled term of AdaMatch (paper Eq. 6): ``mean_i(mask_i * CE(tgt strong_i, argmax
    p~_i))``, averaged over all ``n_t`` samples (masked ones count as zeros, as the authors).

    Args:
        target_strong_logits: ``(n_t, K)`` logits of the strong views.
        aligned: ``(n_t, K)`` aligned pseudo-label distributions of the weak views.
        mask: ``(n_t,)`` 0/1 confidence mask.
    Returns:
        A scalar tensor.
    """
    pseudo = aligned.argmax(dim=1)
    return (F.cross_entropy(target_strong_logits, pseudo, reduction="none") * mask).mean()


def ema_decay(decay: float, num_updates: int, warmup: str = "num-updates") -> float:
    """Decay of the EMA model's update number ``num_updates`` (0 for the first update).

    ``"num-updates"``: ``min(decay, (1 + t) / (10 + t))``, the ``num_updates`` rule of TensorFlow's
    ``tf.train.ExponentialMovingAverage``: 0.1 at the first update, 0.5 at t = 8, 0.9 at t = 80,
    and the nominal ``decay`` (0.999) only from t = 8991 on. The EMA model then tracks the
    recent weights (roughly the last tenth of a run shorter than ~9,000 steps) instead of the
    initial ones. ``"none"``: the constant ``decay``.

    The AdaMatch authors' ``objax.optimizer.ExponentialMovingAverageModule(momentum=0.999)``
    starts its averages at **zero** (``jn.zeros_like``) without bias correction (objax's
    ``debias=False`` default): harmless over their ~30k steps, an untrained (worse: a shrunken)
    model for the first thousands. See docs/adamatch.md.
    """
    if warmup == "none":
        return decay
    if warmup == "num-updates":
        return min(decay, (1.0 + num_updates) / (10.0 + num_updates))
    raise ValueError(f"unknown EMA warm-up {warmup!r}; valid choices: num-updates, none")


@torch.no_grad()
def ema_update_(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ``ema_model`` towards ``model``: floating parameters *and* buffers (running norm
    statistics) get ``decay * ema + (1 - decay) * current``; integer buffers are copied.

    As ``objax.optimizer.ExponentialMovingAverage`` over all model variables in the authors' code.
    """
    for ema_p, p in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1.0 - decay)
    for ema_b, b in zip(ema_model.buffers(), model.buffers(), strict=True):
        if ema_b.dtype.is_floating_point:
            ema_b.lerp_(b, 1.0 - decay)
        else:
            ema_b.copy_(b)


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every buffer of ``model`` (running statistics, counters), ``buffers()`` order."""
    return [b.detach().clone() for b in model.buffers()]


@torch.no_grad()
def restore_buffers_(model: nn.Module, saved: list[torch.Tensor]) -> None:
    """Write back buffers saved by :func:`snapshot_buffers`.

    Writes through ``.data`` so that autograd's version counters do not change: a training-mode
    norm saves its running statistics for backward (unused there), and a tracked write would make
    the pending backward pass fail.
    """
    for b, s in zip(model.buffers(), saved, strict=True):
        b.data.copy_(s)


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes inside the block leave every buffer as it was (the source-only pass)."""
    saved = snapshot_buffers(model)
    try:
        yield model
    finally:
        restore_buffers_(model, saved)


def domain_contexts(n_source: int, n_target: int, device: torch.device | None = None
                    ) -> torch.Tensor:
    """Per-sample context ids of a concatenated batch: ``n_source`` zeros then ``n_target`` ones."""
    return torch.cat([
        torch.zeros(n_source, dtype=torch.long, device=device),
        torch.ones(n_target, dtype=torch.long, device=device),
    ])
