"""Federated domain adaptation: what a client whose images carry no labels trains on.

AdaMatch's unlabelled objective (Berthelot et al., "AdaMatch: A Unified Approach to
Semi-Supervised Learning and Domain Adaptation", ICLR 2022, Sec. 3.3-3.4), run locally on a
client of the target domain, with the pieces of :mod:`fedctx.adamatch.algorithm`:

* every image gets a weak and a strong view (:mod:`fedctx.adamatch.augment`);
* pseudo-labels come from the **model the server sent**: a frozen copy taken at the start of
  local training (the *teacher*), run in training mode (batch statistics, as AdaMatch's weak
  logits) with its buffers left untouched;
* distribution alignment of the teacher's weak-view predictions: ``p_source`` is the labelled
  clients' label distribution the server sends (``label-distribution`` in the train config;
  uniform when absent), ``p_target`` the teacher's mean prediction over this client's weak views
  (one no-grad pass at the start: the teacher does not change during the round, so no moving
  average is needed);
* relative confidence threshold ``tau * c_s`` with ``c_s`` the labelled clients' mean top-class
  probability from the previous round (``source-confidence``); when absent (round 1), the fixed
  threshold ``tau``;
* loss: :func:`~fedctx.adamatch.algorithm.pseudo_label_loss` of the strong views' logits against
  the pseudo-labels, from one training-mode pass over ``[weak, strong]`` under the client's
  context (AdaMatch's joint pass over the target views), so the context's norm statistics learn
  the target domain.

The client's data is only ``x`` and ``contexts``: nothing here reads a label. Deviations from
centralized AdaMatch and why: docs/federated_adaptation.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedctx.adamatch import algorithm as A
from fedctx.adamatch.augment import strong_augment, weak_augment
from fedctx.adamatch.data import normalize
from fedctx.data import ClientData
from fedctx.federated.training import context_picker, sgd_epochs
from fedctx.norm import use_context

__all__ = ["CONFIDENCE_SAMPLES", "TAU", "source_confidence", "threshold", "train_mode_probs",
           "strong_view", "unlabelled_batch_loss", "unlabelled_train", "weak_view"]

#: Relative confidence threshold ratio (AdaMatch paper: 0.9).
TAU = 0.9
#: Training images a labelled client measures its ``confidence`` on.
CONFIDENCE_SAMPLES = 128

Context = int | torch.Tensor


def _augmentation_generator(generator: torch.Generator, device: torch.device | str
                            ) -> torch.Generator:
    """A generator on ``device`` for the augmentations, seeded from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def weak_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Weak view of ``(N, C, H, W)`` images in ``[-1, 1]`` (the scenarios' form), in ``[-1, 1]``:
    a shift of up to ``H >> 3`` pixels (the authors' rule), no mirror (digits)."""
    return normalize(weak_augment(x * 0.5 + 0.5, gen, pad=x.shape[-2] >> 3))


def strong_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Strong view (shift, RandAugment, Cutout) of images in ``[-1, 1]``, in ``[-1, 1]``."""
    return normalize(strong_augment(x * 0.5 + 0.5, gen, pad=x.shape[-2] >> 3))


@torch.no_grad()
def train_mode_probs(model: nn.Module, x: torch.Tensor, context: Context) -> torch.Tensor:
    """``(N, K)`` softmax of ``model`` on ``x`` in training mode (batch statistics), leaving
    every buffer as it was and building no graph."""
    model.train()
    with A.frozen_buffers(model), use_context(model, context):
        return F.softmax(model(x), dim=1)


def threshold(source_confidence: float | None, tau: float = TAU) -> torch.Tensor:
    """AdaMatch's relative threshold ``tau * c_s`` (Sec. 3.4) with the labelled clients' mean
    confidence ``c_s``; the fixed ``tau`` when no labelled client has reported one yet."""
    return torch.tensor(tau * (1.0 if source_confidence is None else float(source_confidence)))


def unlabelled_batch_loss(model: nn.Module, weak: torch.Tensor, strong: torch.Tensor,
                          context: Context, teacher_weak: torch.Tensor, p_source: torch.Tensor,
                          p_target: torch.Tensor, cutoff: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabelled AdaMatch loss of one batch and its ``(B,)`` confidence mask.

    Args:
        model: the student (training mode); one pass over ``[weak, strong]``.
        weak, strong: ``(B, C, H, W)`` views of the same images.
        context: the images' context (an int or ``(B,)`` ids).
        teacher_weak: ``(B, K)`` the teacher's softmax on ``weak``.
        p_source, p_target: ``(K,)`` label distribution of the labelled clients, mean teacher
            prediction on this client.
        cutoff: the confidence threshold (a scalar tensor, :func:`threshold`).
    """
    both = context if isinstance(context, int) else torch.cat([context, context])
    with use_context(model, both):
        strong_logits = model(torch.cat([weak, strong]))[len(weak):]
    aligned = A.align_distribution(teacher_weak, p_source, p_target)
    mask = A.pseudo_label_mask(aligned, cutoff.to(aligned.device))
    return A.pseudo_label_loss(strong_logits, aligned, mask), mask


def _mean_teacher_prediction(teacher: nn.Module, x: torch.Tensor,
                             context: Callable[[torch.Tensor], Context], batch_size: int,
                             gen: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """``p_target``: the teacher's mean softmax over weak views of all of ``x`` (``(K,)``)."""
    total, seen = 0.0, 0
    for start in range(0, len(x), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(x)))
        if len(idx) < 2:
            continue  # batch statistics need two samples
        total = total + train_mode_probs(teacher, weak_view(x[idx].to(device), gen),
                                         context(idx)).sum(0)
        seen += len(idx)
    return total / seen


def unlabelled_train(
    model: nn.Module,
    data: ClientData,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
    num_classes: int,
    label_distribution: Sequence[float] | None = None,
    source_confidence: float | None = None,
    tau: float = TAU,
    proximal_mu: float = 0.0,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Train ``model`` in place on the unlabelled images ``data.x`` with AdaMatch's unlabelled
    objective (module docstring), SGD as :func:`~fedctx.federated.training.sgd_epochs`.

    ``label_distribution``: the labelled clients' ``(K,)`` label distribution (uniform when
    ``None``); ``source_confidence``: their mean top-class probability (``None``: threshold
    ``tau``). Reads ``data.x`` and ``data.contexts`` only. Returns ``(mean train loss, share of
    images whose pseudo-label passed the threshold)``.
    """
    x_all = data.x
    context = context_picker(data.contexts, device)
    gen = _augmentation_generator(generator, device)
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    p_source = (torch.full((num_classes,), 1.0 / num_classes) if label_distribution is None
                else torch.as_tensor(list(label_distribution), dtype=torch.float32)).to(device)
    p_target = _mean_teacher_prediction(teacher, x_all, context, batch_size, gen, device)
    cutoff = threshold(source_confidence, tau)
    kept = [0.0, 0]

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        images = x_all[idx].to(device)
        weak, strong = weak_view(images, gen), strong_view(images, gen)
        teacher_weak = train_mode_probs(teacher, weak, context(idx))
        loss, mask = unlabelled_batch_loss(model, weak, strong, context(idx), teacher_weak,
                                           p_source, p_target, cutoff)
        kept[0] += float(mask.sum())
        kept[1] += len(mask)
        return loss

    loss = sgd_epochs(model, len(x_all), batch_loss, epochs=epochs, batch_size=batch_size, lr=lr,
                      momentum=momentum, weight_decay=weight_decay, generator=generator,
                      proximal_mu=proximal_mu)
    return loss, kept[0] / max(kept[1], 1)


def source_confidence(model: nn.Module, data: ClientData, generator: torch.Generator, *,
                      samples: int = CONFIDENCE_SAMPLES, device: torch.device | str = "cpu"
                      ) -> float:
    """A labelled client's ``confidence``: :func:`~fedctx.adamatch.algorithm.mean_confidence` of
    ``model`` on weak views of ``samples`` random training images, in training mode (as AdaMatch
    measures it on the source batch), buffers untouched. One forward pass."""
    x_all = data.x
    idx = torch.randperm(len(x_all), generator=generator)[:samples]
    weak = weak_view(x_all[idx].to(device), _augmentation_generator(generator, device))
    probs = train_mode_probs(model, weak, context_picker(data.contexts, device)(idx))
    return float(A.mean_confidence(probs))
