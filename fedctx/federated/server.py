"""fedctx's Flower ``ServerApp`` (``fedctx.federated.server:app``).

It reads the experiment from ``context.run_config``, wraps the chosen Flower strategy in a
:class:`~fedctx.federated.norm_strategy.NormPolicyStrategy` (seeded sampling, norm policy, reply
screening) and runs it with Flower's own ``Strategy.start``. After every round (Flower's
``evaluate_fn`` hook) it evaluates per context when scheduled (and, with ``--holdout-domain``,
the held-out domain under every rule of :mod:`fedctx.federated.unseen`), writes the round to
``metrics.jsonl`` and an atomic ``checkpoint.pt``; ``resume = true`` continues from it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedctx.config import SimConfig
from fedctx.data.plots import save_label_heatmap
from fedctx.federated.cohort import CohortGrid, ray_worker_slots
from fedctx.federated.norm_strategy import NormPolicyStrategy, RoundReport
from fedctx.federated.run_config import from_run_config
from fedctx.federated.runtime import build_model, get_runtime
from fedctx.federated.startup import phases
from fedctx.federated.training import evaluate
from fedctx.federated.unseen import evaluate_unseen
from fedctx.results import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    RunRecorder,
    atomic_torch_save,
    clear_results,
    load_checkpoint,
    results_in,
    save_checkpoint,
)
from fedctx.strategies import resolve_strategy

__all__ = ["CHECKPOINT", "PREVIOUS_CHECKPOINT", "Experiment", "app", "make_strategy"]
STARTED_ENV = "FEDCTX_STARTED"  # set by ``python -m fedctx.simulate``: the command's start time

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_run_config(context.run_config)
    started = float(os.environ.get(STARTED_ENV, time.time()))
    Experiment(config, context.run_config, RunRecorder(Path(config.out), config.rounds,
                                                       started=started)).run(grid)


def make_strategy(config: SimConfig, model) -> NormPolicyStrategy:  # noqa: ANN001
    """The run's Flower strategy wrapped with its norm policy."""
    inner = resolve_strategy(config.strategy, plugin_path=config.plugin_path)(config)
    return NormPolicyStrategy(
        inner, model, config.norm_policy, seed=config.seed, min_replies=config.min_clients,
        evaluate_when=lambda r: r % config.eval_every == 0 or r == config.rounds,
        round_timeout=config.round_timeout, max_examples=config.max_examples)


def phase_seconds(report: RoundReport, done: float) -> dict[str, float]:
    """Where a round's wall time (``report.started`` to ``done``) went: ``train`` (sampling,
    sending, the clients' training, the replies' arrival), ``aggregate`` (screening and merging,
    ``aggregate_train``) and ``evaluate`` (client-side evaluation where the policy has it, the
    server's evaluation). Seconds, rounded to the millisecond. The round's recording comes after
    ``done``: the next round's ``between_seconds`` holds it."""
    replied = report.replied if report.replied is not None else done
    merged = report.merged if report.merged is not None else replied
    return {"train": round(replied - report.started, 3), "aggregate": round(merged - replied, 3),
            "evaluate": round(done - merged, 3)}


class Experiment:
    """The server side of one run; ``run(grid)`` executes (or resumes) every round."""

    def __init__(self, config: SimConfig, run_config: dict[str, Any],
                 recorder: RunRecorder) -> None:
        self.config, self.recorder = config, recorder
        self.out = Path(config.out)
        self.rt = get_runtime(run_config)
        fresh = build_model(config, self.rt.data)  # the seeded initial weights
        self.arrays = {k: v.detach().cpu().clone() for k, v in fresh.state_dict().items()}
        self.previous_end: float | None = None  # this process's last round's ``done``
        self.strategy = make_strategy(config, fresh)
        self.previous_is_good = True  # whether checkpoint.pt may become checkpoint.prev.pt

    # ----------------------------------------------------------------- checkpointing
    def save_checkpoint(self, server_round: int) -> None:
        """Commit ``server_round``: weights, strategy state and every recorded round, as
        tensors and plain types only; the replaced checkpoint becomes ``checkpoint.prev.pt``."""
        state = {"round": server_round, "arrays": self.arrays,
                 "strategy": self.strategy.state_dict(), "history": self.recorder.history,
                 "config": self.config.to_dict()}
        save_checkpoint(state, self.out, keep_previous=self.previous_is_good)
        self.previous_is_good = True

    def load_checkpoint(self) -> list[dict[str, Any]]:
        try:
            ckpt, note = load_checkpoint(self.out)
        except FileNotFoundError:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out}; start without "
                                    "--resume") from None
        if note:
            self.recorder.say(f"warning: {note}")
            self.previous_is_good = False  # checkpoint.pt is bad: keep the good previous one
        self.arrays = dict(ckpt["arrays"])
        self.strategy.load_state_dict(ckpt["strategy"], finished_rounds=int(ckpt["round"]))
        return list(ckpt["history"])

    # ----------------------------------------------------------------- evaluation
    def evaluate_on_server(self) -> dict[str, float]:
        """``average`` / ``per-context``: the server holds every context's norm state and
        evaluates the global model on each context's test set."""
        accs = {}
        for k, (x, y) in self.rt.data.test.items():
            norm = self.strategy.norm_for_context(k)
            self.rt.model.load_state_dict({**self.arrays, **norm})
            accs[self.rt.data.context_names[k]] = evaluate(self.rt.model, x, y, k,
                                                           device=self.rt.device)[0]
        return accs

    def evaluate_holdout(self) -> dict[str, float]:
        """The held-out domain's accuracy under every rule the policy allows (see
        :func:`~fedctx.federated.unseen.evaluate_unseen`): the entries are the norm tensors
        the server evaluates each training context with."""
        _, x, y = self.rt.data.holdout
        policy = self.strategy.policy
        entries = ({k: self.strategy.norm_for_context(k)
                    for k in range(self.rt.data.num_contexts)}
                   if policy.evaluates_on_server else None)
        server_norm = self.strategy.norm.outgoing(None) if policy.client_keeps == "stats" else None
        shared = {k: self.arrays[k] for k in self.strategy.split.shared}
        return evaluate_unseen(self.rt.model, shared, entries, server_norm, x, y,
                               device=self.rt.device)

    def client_accuracies(self, report: RoundReport) -> tuple[dict[str, float], dict[str, float]]:
        """``local`` (FedBN) / ``stats-local`` (SiloBN): as in FedBN (Li et al. 2021), every
        client that holds its own normalization state evaluated the global shared weights with
        its own norm on its context's test set; a context's accuracy is the mean over its
        clients. Returns (per context, per client)."""
        per_client: dict[int, float] = {}
        per_ctx: dict[int, list[float]] = {}
        for metrics in report.evaluation.values():
            per_client[int(metrics["partition-id"])] = float(metrics["accuracy"])
        for pid in sorted(per_client):
            per_ctx.setdefault(self.rt.data.clients[pid].context, []).append(per_client[pid])
        names = self.rt.data.context_names
        return ({names[k]: float(np.mean(v)) for k, v in sorted(per_ctx.items())},
                {str(p): a for p, a in sorted(per_client.items())})

    def overall(self, accs: dict[str, float]) -> float:
        sizes = {self.rt.data.context_names[k]: len(y) for k, (_, y) in self.rt.data.test.items()}
        total = sum(sizes[n] for n in accs)
        return sum(accs[n] * sizes[n] for n in accs) / max(total, 1)

    # ----------------------------------------------------------------- one round
    def round_record(self, report: RoundReport) -> dict[str, Any]:
        return {
            "round": report.server_round, "train_loss": report.train_loss,
            "clients_sampled": len(report.sampled),
            "sampled": sorted(self.strategy.client_key(n) for n in report.sampled),
            "clients_ok": report.accepted,
            "rejected": len(report.rejections), "failures": report.failures,
            "failed": report.failed, "rejected_by_check": report.rejected_by_check,
            "rejections": report.rejections, "ray_nodes": report.ray_nodes,
            **{k: v for k, v in report.metrics.items() if k != "train-loss"},
        }

    def after_round(self, start_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: record, evaluate when scheduled, checkpoint."""
        if start_round == 0:  # Flower's call before the first round
            return None
        server_round = start_round + self.strategy.round_offset
        report = self.strategy.reports.pop(server_round)
        self.arrays = arrays.to_torch_state_dict()
        if self.recorder.startup_seconds is None and self.strategy.registered_at:
            self.recorder.startup_seconds = self.strategy.registered_at - self.recorder.started
        record = self.round_record(report)
        if self.strategy.evaluate_when(server_round):
            if self.strategy.policy.evaluates_on_server:
                accs = self.evaluate_on_server()
            else:
                accs, per_client = self.client_accuracies(report)
                record.update(accuracy_per_client=per_client, clients_evaluated=len(per_client))
            record.update(accuracy=self.overall(accs), accuracy_per_context=accs)
            if self.rt.data.holdout is not None:
                record["holdout_accuracy"] = self.evaluate_holdout()
        done = time.time()
        record["seconds"] = done - report.started
        record["phase_seconds"] = phase_seconds(report, done)
        if self.previous_end is not None:  # the last round's recording, Flower's loop
            record["between_seconds"] = round(report.started - self.previous_end, 3)
        self.previous_end = done
        self.recorder.round(record, commit=lambda: self.save_checkpoint(server_round))
        if server_round == 1:  # drawn after the first round, not while the clients start
            save_label_heatmap(self.rt.data, self.out / "label_counts.png")
        return MetricRecord({"accuracy": record["accuracy"]}) if "accuracy" in record else None

    def member(self, node_id: int) -> tuple[int, int] | None:
        """A registered node's (partition id, number of examples), for :class:`CohortGrid`."""
        info = self.strategy.nodes.get(node_id)
        if info is None or info.partition_id is None:
            return None
        return info.partition_id, info.num_examples or 1

    def cohort_grid(self, grid: Grid) -> Grid | CohortGrid:
        """``grid``, or a :class:`~fedctx.federated.cohort.CohortGrid` over it: ``--cohort-size
        N`` clients per message, or (0) one message per Ray worker slot when on Ray; with
        ``--cohort-sums`` train cohorts answer with their sums."""
        size, sums = self.config.cohort_size, self.config.cohort_sums
        if sums and (why := self.strategy.sums_unsupported()) is not None:
            raise ValueError(f"--cohort-sums: {why}")
        if size == 1:
            return grid
        if size > 1:
            return CohortGrid(grid, self.member, size=size, sums=sums)
        slots = ray_worker_slots(self.config.cpus_per_client, self.config.gpus_per_client)
        return grid if slots is None else CohortGrid(grid, self.member, cohorts=slots, sums=sums)

    def run(self, grid: Grid) -> None:
        if not self.config.resume:
            if self.config.overwrite:
                clear_results(self.out)
            elif found := results_in(self.out):
                raise FileExistsError(
                    f"--out {self.out} holds another run's results ({', '.join(found)}); give "
                    "a new --out, --resume to continue it or --overwrite to replace it")
        history = self.load_checkpoint() if self.config.resume else []
        self.recorder.start(self.config.to_dict(), history)
        if history:
            self.recorder.say(f"Resuming from round {len(history)} in {self.out}")
        if hasattr(grid, "pull_interval"):  # Flower's in-memory grid polls every 0.1 s by default
            grid.pull_interval = 0.005
        grid = self.cohort_grid(grid)
        c = self.config
        train_config = ConfigRecord({"lr": c.lr, "momentum": c.momentum,
                                     "weight-decay": c.weight_decay,
                                     "local-epochs": c.local_epochs, "batch-size": c.batch_size})
        remaining = c.rounds - self.strategy.round_offset
        if remaining > 0:
            self.strategy.start(grid=grid, initial_arrays=ArrayRecord(self.arrays),
                                num_rounds=remaining, train_config=train_config,
                                evaluate_fn=self.after_round)
        self.finish()

    def finish(self) -> None:
        last = self.recorder.history[-1]
        on_server = self.strategy.policy.evaluates_on_server
        shared = {k: self.arrays[k] for k in self.strategy.split.shared}
        model_state = {"shared": shared, "norm": self.strategy.norm.state_dict(),
                       "norm_policy": str(self.strategy.policy),
                       "context_names": self.rt.data.context_names,
                       "config": self.config.to_dict()}
        atomic_torch_save(model_state, self.out / "model.pt")
        self.recorder.finish({
            "accuracy": last["accuracy"], "accuracy_per_context": last["accuracy_per_context"],
            "rounds": last["round"], "final_train_loss": last["train_loss"],
            "contexts": self.rt.data.context_names, "real_domains": self.rt.data.real_domains,
            "missing_domains": list(getattr(self.rt.data, "missing_domains", [])),
            "clients": self.config.clients, "norm": self.config.norm,
            "norm_policy": self.config.norm_policy, "strategy": self.config.strategy,
            "seed": self.config.seed, "evaluated_on": "server" if on_server else "clients",
            "wall_seconds": time.time() - self.recorder.started,
            "startup_seconds": self.recorder.startup_seconds,
            "startup": phases(self.recorder.started),
            "failed_rounds": list(self.strategy.failed_rounds),
            **({} if on_server else {"accuracy_per_client": last["accuracy_per_client"],
                                     "clients_evaluated": last["clients_evaluated"]}),
            **self.domain_summary(last),
        })

    def domain_summary(self, last: dict[str, Any]) -> dict[str, Any]:
        """What the domain options add to the summary: the held-out domain's accuracy (per
        rule, and under ``--unseen-rule``; ``None`` where the policy cannot follow it), the
        unlabelled domains, and the adjusted Rand index of discovered contexts."""
        data, out = self.rt.data, {}
        if data.holdout is not None:
            per_rule = last.get("holdout_accuracy", {})
            out["holdout"] = {"domain": data.holdout[0], "rule": self.config.unseen_rule,
                              "accuracy": per_rule.get(self.config.unseen_rule),
                              "accuracy_per_rule": per_rule}
        if data.unlabelled_domains:
            out["unlabelled_domains"] = data.unlabelled_domains
        if data.context_ari is not None:
            out["context_ari"] = data.context_ari
        return out
