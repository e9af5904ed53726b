"""Norm policies: what the server does with normalization tensors.

The shared (non-norm) weights are aggregated by a Flower strategy; a norm policy decides, around
it, which normalization tensors travel and how they are merged:

* ``average`` (FedAvg): normalization averaged over all clients like everything else.
* ``local`` (FedBN, Li et al. 2021): normalization never leaves the client; it persists across
  rounds in the client's state and the client evaluates with its own.
* ``stats-local`` (SiloBN, Andreux et al. 2020): affine parameters averaged over all clients,
  running statistics kept local.
* ``per-context``: the server keeps a bank with one entry per context; each client receives the
  entry of its context (a client holding several contexts: the context it registered with, its
  majority context); after a round, entry *k* merges the clients that hold samples of context
  *k*, weighted by their number of samples **of context k** (``context-counts``; a client that
  reports none counts ``num-examples`` at its ``context``); a context with no client this round
  keeps its entry; a client of a context never seen before starts from the average of the known
  entries and creates its entry. Tensors whose dim 0 indexes contexts
  (:attr:`~fedctx.federated.params.StateSplit.by_context`, e.g. ``ContextNorm``'s ``(K, C)``
  statistics and affine) are merged row by row instead: row *k* over the holders of *k* only,
  weighted by their count of *k* (a client's row *k* means nothing if it holds no sample of
  *k*), and every bank entry carries these rows, so a client holding several contexts gets
  each context's own row.

"Merged" is the ``rule`` of :class:`ServerNormState`: the example-weighted average by default
(integer tensors keep the maximum, see :func:`fedctx.federated.params.weighted_average`), or the
robust rule the strategy aggregates its shared weights with (median, trimmed mean, Krum; see
:mod:`fedctx.federated.params`), so one client's norm tensors cannot poison the model where its
shared weights cannot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from fedctx.federated.params import Rule, StateSplit, WeightedSum, weighted_average

Tensors = dict[str, torch.Tensor]


class NormPolicy(StrEnum):
    AVERAGE = "average"
    LOCAL = "local"
    STATS_LOCAL = "stats-local"
    PER_CONTEXT = "per-context"

    @property
    def evaluates_on_server(self) -> bool:
        """Whether the server holds complete norm state to evaluate the global model."""
        return self in (NormPolicy.AVERAGE, NormPolicy.PER_CONTEXT)

    @property
    def client_keeps(self) -> str:
        """Which norm tensors the client keeps locally: ``"none"``, ``"all"`` or ``"stats"``."""
        return {NormPolicy.LOCAL: "all", NormPolicy.STATS_LOCAL: "stats"}.get(self, "none")


@dataclass
class NormUpdate:
    """The norm tensors one client sent back, with its context and example count;
    ``context_counts[k]``: its training samples of context ``k`` (``None``: all of
    ``context``)."""

    context: int
    num_examples: int
    tensors: Tensors
    context_counts: list[int] | None = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], tensors: Tensors) -> NormUpdate:
        """The update a train reply's ``metrics`` describe (``context``, ``num-examples`` and,
        if present, ``context-counts``), carrying ``tensors``."""
        counts = metrics.get("context-counts")
        return cls(int(metrics["context"]), int(metrics["num-examples"]), tensors,
                   None if counts is None else [int(c) for c in counts])

    def holds(self) -> dict[int, int]:
        """Context -> number of this client's samples of it (contexts it holds only)."""
        if self.context_counts is None:
            return {self.context: self.num_examples}
        return {k: n for k, n in enumerate(self.context_counts) if n > 0}


class ServerNormState:
    """Server-side normalization state under one :class:`NormPolicy`."""

    def __init__(self, policy: NormPolicy, split: StateSplit, initial: Tensors,
                 rule: Rule = weighted_average) -> None:
        self.policy = policy
        self.split = split
        self.rule = rule
        self.initial = {k: initial[k].clone() for k in split.norm}
        self.global_norm: Tensors = dict(self.initial)  # average / stats-local (affine part)
        self.bank: dict[int, Tensors] = {}  # per-context

    def _rows(self) -> Tensors:
        """The context-indexed tensors: row *k* from bank entry *k* (initial if none)."""
        rows = {key: self.initial[key].clone() for key in self.split.by_context}
        for k, entry in self.bank.items():
            for key, value in rows.items():
                if k < value.shape[0]:
                    value[k] = entry[key][k]
        return rows

    def _bank_mean(self) -> Tensors:
        if not self.bank:
            return dict(self.initial)
        entries = list(self.bank.values())
        return {**weighted_average(entries, [1.0] * len(entries)), **self._rows()}

    def outgoing(self, context: int | None) -> Tensors:
        """Norm tensors sent to a client of ``context`` (it may replace some with its own);
        ``None``: a client of unknown context (per-context: the mean of the bank)."""
        if self.policy is NormPolicy.PER_CONTEXT:
            return self.bank[context] if context in self.bank else self._bank_mean()
        return self.global_norm

    def expected_reply_keys(self) -> tuple[str, ...]:
        """Norm keys a client must send back."""
        return {"none": self.split.norm, "stats": self.split.norm_affine,
                "all": ()}[self.policy.client_keeps]

    def update(self, updates: list[NormUpdate]) -> None:
        """Merge the round's norm tensors as the policy says."""
        if not updates or self.policy is NormPolicy.LOCAL:
            return
        if self.policy is NormPolicy.PER_CONTEXT:
            self._update_bank(updates)
            return
        merged = self.rule([u.tensors for u in updates], [u.num_examples for u in updates])
        self.global_norm = {**self.global_norm, **merged}

    def update_from_sums(self, total: WeightedSum, by_context: dict[int, WeightedSum]) -> None:
        """:meth:`update` from sums instead of the clients' tensors (the example-weighted
        average rule only): ``total`` over every client weighted by ``num-examples``, and
        ``by_context[k]`` of the norm tensors over the holders of *k* weighted by their count
        of *k*. The same merge as :meth:`update` to float tolerance."""
        if self.rule is not weighted_average:
            raise ValueError("norm state merges from sums only under the example-weighted "
                             "average rule")
        if self.policy is NormPolicy.LOCAL or total.weight <= 0:
            return
        if self.policy is not NormPolicy.PER_CONTEXT:
            keys = self.expected_reply_keys()
            self.global_norm = {**self.global_norm,
                                **total.mean({k: self.initial[k] for k in keys})}
            return
        whole = {k: self.initial[k] for k in self.split.norm if k not in self.split.by_context}
        rows = self._rows()
        for k in sorted(by_context):
            entry = by_context[k].mean(self.initial)
            self.bank[k] = {key: entry[key] for key in whole}
            for key, value in rows.items():
                if k < value.shape[0]:
                    value[k] = entry[key][k]
        for entry in self.bank.values():
            entry.update(rows)

    def _update_bank(self, updates: list[NormUpdate]) -> None:
        """Entry *k* := rule over the holders of *k*, weighted by their counts of *k*; the
        context-indexed tensors row by row (:meth:`_merged_rows`), shared by every entry."""
        holders: dict[int, list[tuple[Tensors, int]]] = {}
        for u in updates:
            for k, n in u.holds().items():
                holders.setdefault(k, []).append((u.tensors, n))
        whole = [key for key in self.split.norm if key not in self.split.by_context]
        rows = self._merged_rows(holders)
        for k in sorted(holders):
            group = holders[k]
            self.bank[k] = self.rule([{key: t[key] for key in whole} for t, _ in group],
                                     [n for _, n in group])
        for entry in self.bank.values():
            entry.update(rows)

    def _merged_rows(self, holders: dict[int, list[tuple[Tensors, int]]]) -> Tensors:
        """The context-indexed tensors: row *k* := rule over the rows *k* of the holders of
        *k*, weighted by their counts of *k*; rows of contexts without holders unchanged."""
        rows = self._rows()
        for k, group in sorted(holders.items()):
            if not rows or k >= next(iter(rows.values())).shape[0]:
                continue
            merged = self.rule([{key: t[key][k] for key in rows} for t, _ in group],
                               [n for _, n in group])
            for key, value in rows.items():
                value[k] = merged[key]
        return rows

    def for_evaluation(self, context: int) -> Tensors | None:
        """Norm tensors to evaluate the global model on ``context``; ``None`` if only clients
        hold them (``local``, ``stats-local``: evaluation runs on the clients)."""
        return self.outgoing(context) if self.policy.evaluates_on_server else None

    def state_dict(self) -> dict[str, object]:
        return {"global_norm": self.global_norm, "bank": self.bank}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.global_norm = dict(state["global_norm"])  # type: ignore[arg-type]
        self.bank = {int(k): dict(v) for k, v in state["bank"].items()}  # type: ignore[union-attr]


def summed_parts(policy: NormPolicy, tensors: Tensors, norm_keys: Iterable[str],
                 update: NormUpdate) -> tuple[Tensors, dict[int, tuple[Tensors, int]]]:
    """How one client's reply enters a sum of replies (:class:`~fedctx.federated.params.
    WeightedSum`): the tensors the sum over all clients takes (weight: ``update.num_examples``)
    and, under ``per-context``, the norm tensors each context it holds takes (weight: its count
    of that context), as :meth:`ServerNormState.update` merges them."""
    if policy is not NormPolicy.PER_CONTEXT:
        return tensors, {}
    norm = {k: tensors[k] for k in norm_keys if k in tensors}
    return ({k: v for k, v in tensors.items() if k not in norm},
            {k: (norm, n) for k, n in update.holds().items()})


def merge_client_norm(policy: NormPolicy, split: StateSplit, received: Tensors,
                      kept: Tensors | None) -> Tensors:
    """The norm tensors a client trains with: what it received, with what it keeps locally
    (if it has any yet) taking precedence."""
    if kept is None or policy.client_keeps == "none":
        return received
    keep = split.norm if policy.client_keeps == "all" else split.norm_stats
    return {**received, **{k: kept[k] for k in keep}}


def client_split_reply(policy: NormPolicy, split: StateSplit, norm: Tensors
                       ) -> tuple[Tensors, Tensors]:
    """Split a client's trained norm tensors into (sent to the server, kept locally)."""
    mode = policy.client_keeps
    if mode == "none":
        return norm, {}
    if mode == "all":
        return {}, norm
    return ({k: norm[k] for k in split.norm_affine}, {k: norm[k] for k in split.norm_stats})
