"""Split a model's state into shared tensors and normalization tensors, by the owning module's
type (never by a substring of the name, which is how FedBN's code decides and how it breaks for
models that name their layers otherwise).

Normalization modules (:func:`fedctx.norm.is_norm_module`): ``torch.nn`` batch/instance/group/
layer/local-response norms, and classes that declare ``is_normalization = True`` (every fedctx
norm layer) or are registered with :func:`fedctx.norm.register_norm` (a third-party norm);
never convolutions or linear layers (e.g. ``WSConv2d``'s weight is a shared weight). Tensors of
sub-modules of a normalization module belong to it too.

Transient state is never model state: a module may declare buffers that only make sense inside
the process that trains it (``transient_buffers``, a class attribute; e.g. the cross-iteration
history of ``CrossIterationBatchNorm``). They must be registered non-persistent, so they are in
no ``state_dict`` and therefore in no role of the split: never sent, averaged or kept.
:func:`split_state` checks this and refuses a model whose declared transient buffer is
persistent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedctx.norm import ContextNorm, is_norm_module

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StateSplit:
    """Names of a model's ``state_dict`` entries, by role.

    ``shared``: every tensor not owned by a normalization module.
    ``norm_affine``: learnable tensors of normalization modules (parameters).
    ``norm_stats``: non-learnable tensors of normalization modules (running statistics, counters).
    ``by_context``: the norm tensors whose dim 0 indexes contexts (row ``k`` serves context
    ``k`` only, e.g. ``ContextNorm``'s ``(K, C)`` statistics and affine; see
    :func:`context_indexed`).
    """

    shared: tuple[str, ...]
    norm_affine: tuple[str, ...]
    norm_stats: tuple[str, ...]
    by_context: tuple[str, ...] = ()

    @property
    def norm(self) -> tuple[str, ...]:
        return self.norm_affine + self.norm_stats


def transient_keys(model: nn.Module) -> tuple[str, ...]:
    """Names of the buffers ``model``'s modules declare transient (``transient_buffers``)."""
    keys = []
    for prefix, m in model.named_modules():
        for name in getattr(type(m), "transient_buffers", ()):
            keys.append(f"{prefix}.{name}" if prefix else name)
    return tuple(keys)


def context_indexed(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own tensors whose dim 0 indexes contexts: what its class declares
    in ``context_indexed`` (a class attribute, for layers of your own), else, for
    :class:`fedctx.norm.ContextNorm`, its per-context running statistics, counters and (unless
    ``shared_affine``) affine parameters."""
    declared = getattr(type(module), "context_indexed", None)
    if declared is not None:
        return tuple(declared)
    if isinstance(module, ContextNorm):
        stats = ("running_mean", "running_var", "num_batches_tracked")
        return stats if module.shared_affine else ("weight", "bias", *stats)
    return ()


def split_state(model: nn.Module) -> StateSplit:
    """Classify every ``state_dict`` key of ``model`` as shared, norm affine or norm statistics.

    Raises:
        ValueError: a buffer declared transient (``transient_buffers``) is in the state dict
            (registered persistent), so it would be sent and aggregated.
    """
    state_keys = set(model.state_dict(keep_vars=True))
    leaked = [k for k in transient_keys(model) if k in state_keys]
    if leaked:
        raise ValueError(f"transient buffers {leaked[:3]} are in the state dict; register them "
                         "with persistent=False (they must not be aggregated across clients)")
    norm_prefixes = [name for name, m in model.named_modules() if is_norm_module(m)]
    param_names = {name for name, _ in model.named_parameters()}

    def owned_by_norm(key: str) -> bool:
        return any(p == "" or key.startswith(p + ".") for p in norm_prefixes)

    shared, affine, stats = [], [], []
    for key in model.state_dict(keep_vars=True):
        if not owned_by_norm(key):
            shared.append(key)
        elif key in param_names:
            affine.append(key)
        else:
            stats.append(key)
    by_context = {f"{prefix}.{name}" if prefix else name
                  for prefix, m in model.named_modules() if is_norm_module(m)
                  for name in context_indexed(m)}
    return StateSplit(tuple(shared), tuple(affine), tuple(stats),
                      tuple(k for k in affine + stats if k in by_context))


def weighted_average(states: list[Tensors], weights: list[float]) -> Tensors:
    """Example-weighted average of tensors with identical keys.

    Floating tensors: ``sum_i w_i x_i / sum_i w_i`` (computed in float64, cast back). Integer
    tensors (e.g. ``num_batches_tracked``) are never averaged as floats: the element-wise maximum
    is kept, in the original dtype.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.dtype.is_floating_point:
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc += s[key].to(torch.float64) * (w / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).amax(0)
    return out


@dataclass
class WeightedSum:
    """A running ``sum_i w_i x_i`` (float64) and ``sum_i w_i`` over states with identical keys:
    :func:`weighted_average` taken apart, so that parts of a set of states can be summed where
    they are (a cohort's worker) and merged elsewhere (the server). Integer tensors keep the
    element-wise maximum, as in :func:`weighted_average`. ``mean()`` equals
    :func:`weighted_average` of the same states to float tolerance (the float64 sums are taken
    in another order), not bit for bit."""

    sums: Tensors = field(default_factory=dict)
    weight: float = 0.0

    def add(self, state: Tensors, weight: float) -> None:
        """Add ``weight * state`` (one fused pass over the floating tensors)."""
        if weight <= 0:
            raise ValueError(f"a state's weight must be positive, got {weight}")
        if not self.sums:  # the first state: its scaled copy is the sum
            self.sums = {k: v.detach().to(torch.float64) * weight if v.dtype.is_floating_point
                         else v.detach().clone() for k, v in state.items()}
            self.weight = weight
            return
        self._check_keys(state)
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        torch._foreach_add_([self.sums[k] for k in floats], [state[k].detach() for k in floats],
                            alpha=weight)
        for key, value in state.items():
            if not value.dtype.is_floating_point:
                self.sums[key] = torch.maximum(self.sums[key], value)
        self.weight += weight

    def merge(self, other: WeightedSum) -> None:
        """Add another sum (of a disjoint set of states)."""
        self._merge(other.sums, other.weight)

    def _check_keys(self, tensors: Tensors) -> None:
        if self.sums and tensors.keys() != self.sums.keys():
            raise ValueError(f"keys differ: {sorted(set(tensors) ^ set(self.sums))[:5]}")

    def _merge(self, sums: Tensors, weight: float) -> None:
        self._check_keys(sums)
        for key, value in sums.items():
            if key not in self.sums:
                self.sums[key] = value.clone()
            elif value.dtype.is_floating_point:
                self.sums[key] += value
            else:
                self.sums[key] = torch.maximum(self.sums[key], value)
        self.weight += weight

    def mean(self, like: Tensors) -> Tensors:
        """``sum_i w_i x_i / sum_i w_i`` for the keys of ``like``, in ``like``'s dtypes."""
        if self.weight <= 0:
            raise ValueError("the mean of an empty sum")
        return {k: (self.sums[k] / self.weight if self.sums[k].dtype.is_floating_point
                    else self.sums[k]).to(like[k].dtype) for k in like}


Rule = Callable[[list[Tensors], list[float]], Tensors]
"""How client states are merged: ``rule(states, weights) -> state`` (same keys and shapes)."""


def _stacked(states: list[Tensors], key: str) -> torch.Tensor:
    """``(n, *shape)``: the clients' ``key``, sorted along dim 0, in float64 if floating."""
    stack = torch.stack([s[key] for s in states])
    return (stack.to(torch.float64) if stack.dtype.is_floating_point else stack).sort(0).values


def _lower_median(stack: torch.Tensor) -> torch.Tensor:
    return stack[(stack.shape[0] - 1) // 2]


def coordinate_median(states: list[Tensors], weights: list[float]) -> Tensors:
    """Element-wise median over clients (FedMedian, Yin et al. 2018), unweighted like Flower's
    ``FedMedian``: the mean of the two middle values for an even count (as ``np.median``);
    integer tensors take the lower median. ``weights`` are ignored."""
    out: Tensors = {}
    for key, first in states[0].items():
        stack = _stacked(states, key)
        if first.dtype.is_floating_point:
            n = stack.shape[0]
            out[key] = ((stack[(n - 1) // 2] + stack[n // 2]) / 2).to(first.dtype)
        else:
            out[key] = _lower_median(stack)
    return out


def trimmed_mean(beta: float) -> Rule:
    """The rule of FedTrimmedAvg (Yin et al. 2018), as Flower's ``FedTrimmedAvg(beta)``:
    per element, drop the ``int(beta * n)`` lowest and highest of the ``n`` clients' values and
    average the rest (unweighted); integer tensors take the lower median."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed mean: beta must be in [0, 0.5), got {beta}")

    def rule(states: list[Tensors], weights: list[float]) -> Tensors:
        cut = int(beta * len(states))
        out: Tensors = {}
        for key, first in states[0].items():
            stack = _stacked(states, key)
            out[key] = (stack[cut:len(states) - cut].mean(0).to(first.dtype)
                        if first.dtype.is_floating_point else _lower_median(stack))
        return out

    return rule


def krum(num_malicious: int, num_selected: int = 1) -> Rule:
    """The rule of Krum / Multi-Krum (Blanchard et al. 2017), as Flower's ``Krum`` and
    ``MultiKrum``: each state's score is the sum of squared L2 distances (over its floating
    tensors) to its ``n - num_malicious - 2`` nearest others (at least 1); the
    ``num_selected`` lowest-scoring states are merged by :func:`weighted_average`."""

    def rule(states: list[Tensors], weights: list[float]) -> Tensors:
        flat = torch.stack([torch.cat([v.to(torch.float64).flatten() for v in s.values()
                                       if v.dtype.is_floating_point] or [torch.zeros(1)])
                            for s in states])
        dist = torch.cdist(flat, flat).square()
        nearest = max(1, len(states) - num_malicious - 2)
        scores = dist.sort(1).values[:, 1:nearest + 1].sum(1)
        best = scores.argsort(stable=True)[:max(1, num_selected)].tolist()
        return weighted_average([states[i] for i in best], [weights[i] for i in best])

    return rule
