"""The Flower ``ServerApp``: registry of clients, seeded sampling, a Flower strategy for the
shared weights with a norm policy around it, screening of bad replies, evaluation per context,
and an atomic checkpoint after every round (``--resume`` continues from it)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedctx.config import SimConfig
from fedctx.data.plots import save_label_heatmap
from fedctx.federated.params import StateSplit
from fedctx.federated.policy import NormPolicy, NormUpdate, ServerNormState
from fedctx.federated.runtime import build_model, get_runtime
from fedctx.federated.training import evaluate
from fedctx.results import RunRecorder, atomic_torch_save
from strategies import resolve_strategy

log = logging.getLogger("fedctx")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class ClientInfo:
    partition_id: int
    node_id: int
    context: int
    num_examples: int


class _SampledNodes:
    """A view of the grid that offers exactly the nodes fedctx sampled to the Flower strategy."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int,
                   server_round: int) -> list[int]:
    """Partition ids trained in ``server_round``: a function of (seed, round) only, so a resumed
    run samples as the uninterrupted one would."""
    n = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=n, replace=False))


def register_clients(grid: Grid, expected: int) -> dict[int, ClientInfo]:
    """Ask every node for its partition id, context and size (one ``query`` round)."""
    node_ids: list[int] = []
    for _ in range(600):
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= expected:
            break
        time.sleep(0.1)
    messages = [Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in node_ids]
    registry: dict[int, ClientInfo] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise RuntimeError(f"client registration failed: {reply.error.reason}")
        m = reply.content["metrics"]
        pid = int(m["partition-id"])
        registry[pid] = ClientInfo(pid, reply.metadata.src_node_id, int(m["context"]),
                                   int(m["num-examples"]))
    if len(registry) != expected:
        raise RuntimeError(f"expected {expected} clients to register, {len(registry)} did")
    return registry


def screen_reply(reply: Message, expected: dict[str, torch.Tensor], norm_keys: Iterable[str],
                 norm_ref: dict[str, torch.Tensor]) -> str | None:
    """Why a training reply must be rejected, or ``None`` if it is sound.

    Checks: no error, ``arrays`` and ``metrics`` present, positive ``num-examples``, exactly the
    expected keys, and for each tensor the expected shape, dtype and finite values.
    """
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    content = reply.content
    if "arrays" not in content or "metrics" not in content:
        return "reply lacks 'arrays' or 'metrics'"
    n = content["metrics"].get("num-examples")
    if not isinstance(n, int | float) or n <= 0:
        return f"bad num-examples {n!r}"
    groups = [("arrays", content["arrays"], expected)]
    norm_keys = tuple(norm_keys)
    if norm_keys:
        if "norm" not in content:
            return "reply lacks 'norm'"
        groups.append(("norm", content["norm"], {k: norm_ref[k] for k in norm_keys}))
    for name, record, ref in groups:
        got = set(record.keys())
        if got != set(ref):
            extra, missing = sorted(got - set(ref))[:3], sorted(set(ref) - got)[:3]
            return f"{name}: wrong keys (unexpected {extra}, missing {missing})"
        for key, tensor in record.to_torch_state_dict().items():
            want = ref[key]
            if tuple(tensor.shape) != tuple(want.shape):
                return f"{name}.{key}: shape {tuple(tensor.shape)} != {tuple(want.shape)}"
            if tensor.dtype != want.dtype:
                return f"{name}.{key}: dtype {tensor.dtype} != {want.dtype}"
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                return f"{name}.{key}: non-finite values"
    return None


class Federation:
    """The server side of one run; ``run(grid)`` executes (or resumes) every round."""

    def __init__(self, config: SimConfig, recorder: RunRecorder) -> None:
        self.config = config
        self.recorder = recorder
        self.out = Path(config.out)
        self.rt = get_runtime(config)
        self.split: StateSplit = self.rt.split
        self.policy = NormPolicy(config.norm_policy)
        self.strategy = resolve_strategy(config.strategy)(config)
        fresh = build_model(config, self.rt.data)  # the seeded initial weights, not the cache's
        init = {k: v.detach().cpu().clone() for k, v in fresh.state_dict().items()}
        self.reference = init
        self.shared = {k: init[k] for k in self.split.shared}
        self.norm = ServerNormState(self.policy, self.split, init)
        self.start_round = 1
        self.trained: set[int] = set()  # partition ids that hold their own norm state

    # ----------------------------------------------------------------- checkpointing
    def save_checkpoint(self, server_round: int) -> None:
        state = {"round": server_round, "shared": self.shared, "norm": self.norm.state_dict(),
                 "strategy": self.strategy.__dict__.copy(), "history": self.recorder.history,
                 "trained": sorted(self.trained), "config": self.config.to_dict()}
        try:
            atomic_torch_save(state, self.out / CHECKPOINT)
        except Exception:  # noqa: BLE001 - a strategy with unpicklable state resumes fresh
            atomic_torch_save({**state, "strategy": None}, self.out / CHECKPOINT)

    def load_checkpoint(self) -> list[dict[str, Any]]:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
        ckpt = torch.load(path, weights_only=False)
        self.shared = ckpt["shared"]
        self.norm.load_state_dict(ckpt["norm"])
        if ckpt["strategy"] is not None:
            self.strategy.__dict__.update(ckpt["strategy"])
        self.start_round = int(ckpt["round"]) + 1
        self.trained = set(ckpt["trained"])
        return list(ckpt["history"])

    # ----------------------------------------------------------------- one round
    def _train_messages(self, server_round: int, clients: list[ClientInfo]) -> list[Message]:
        cfg = ConfigRecord({
            "lr": self.config.lr, "momentum": self.config.momentum,
            "weight-decay": self.config.weight_decay, "local-epochs": self.config.local_epochs,
            "batch-size": self.config.batch_size,
        })
        nodes = _SampledNodes([c.node_id for c in clients])
        base = list(self.strategy.configure_train(server_round, ArrayRecord(self.shared), cfg,
                                                  nodes))
        if not base:
            return []
        arrays, config = base[0].content["arrays"], base[0].content["config"]
        norm_records: dict[int, ArrayRecord] = {}
        messages = []
        for c in clients:
            content = RecordDict({"arrays": arrays, "config": config})
            if c.context not in norm_records:
                norm_records[c.context] = ArrayRecord(self.norm.outgoing(c.context))
            content["norm"] = norm_records[c.context]
            messages.append(Message(content, message_type=MessageType.TRAIN,
                                    dst_node_id=c.node_id))
        return messages

    def _evaluate(self, registry: dict[int, ClientInfo], grid: Grid, server_round: int
                  ) -> tuple[dict[str, float], dict[int, float]]:
        """Test accuracy per context and, where clients hold their own norm state, per client.

        ``average`` / ``per-context``: the server holds every context's norm state and evaluates
        the global model on each context's test set. ``local`` (FedBN) / ``stats-local``
        (SiloBN): as in FedBN (Li et al. 2021), every client that holds its own normalization
        state (it has trained at least once) evaluates the global shared weights with its own
        norm on its context's test set; a context's accuracy is the mean over its clients.
        Clients never sampled hold only the initial normalization state and are not evaluated
        (their number is recorded as ``clients_evaluated`` against the registry).
        """
        names = self.rt.data.context_names
        if self.policy.evaluates_on_server:
            accs = {}
            for k, (x, y) in self.rt.data.test.items():
                self.rt.model.load_state_dict({**self.shared, **self.norm.for_evaluation(k)})
                accs[names[k]] = evaluate(self.rt.model, x, y, k, device=self.rt.device)[0]
            return accs, {}
        content = RecordDict({"arrays": ArrayRecord(self.shared),
                              "norm": ArrayRecord(self.norm.outgoing(0)),
                              "config": ConfigRecord({"server-round": server_round})})
        messages = [Message(content, message_type=MessageType.EVALUATE,
                            dst_node_id=registry[pid].node_id) for pid in sorted(self.trained)]
        per_client: dict[int, float] = {}
        for reply in grid.send_and_receive(messages):
            if reply.has_error():
                log.warning("evaluation failed on node %s: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            m = reply.content["metrics"]
            per_client[int(m["partition-id"])] = float(m["accuracy"])
        per_ctx: dict[int, list[float]] = {}
        for pid in sorted(per_client):
            per_ctx.setdefault(registry[pid].context, []).append(per_client[pid])
        accs = {names[k]: float(np.mean(v)) for k, v in sorted(per_ctx.items())}
        return accs, dict(sorted(per_client.items()))

    def _overall(self, accs: dict[str, float]) -> float:
        sizes = {self.rt.data.context_names[k]: len(y) for k, (_, y) in self.rt.data.test.items()}
        total = sum(sizes[n] for n in accs)
        return sum(accs[n] * sizes[n] for n in accs) / max(total, 1)

    def run_round(self, grid: Grid, registry: dict[int, ClientInfo], server_round: int
                  ) -> dict[str, Any]:
        t0 = time.time()
        pids = sample_clients(len(registry), self.config.fraction, self.config.min_clients,
                              self.config.seed, server_round)
        clients = [registry[p] for p in pids]
        by_node = {c.node_id: c for c in clients}
        replies = list(grid.send_and_receive(self._train_messages(server_round, clients)))
        # Replies arrive in completion order; aggregate in partition order so that float sums,
        # and so the run, are reproducible.
        replies.sort(key=lambda r: by_node[r.metadata.src_node_id].partition_id
                     if r.metadata.src_node_id in by_node else len(registry))
        accepted, rejected, failures, losses = [], [], 0, []
        norm_keys = self.norm.expected_reply_keys()
        for reply in replies:
            reason = screen_reply(reply, {k: self.reference[k] for k in self.split.shared},
                                  norm_keys, self.reference)
            if reason is None:
                accepted.append(reply)
                continue
            node = reply.metadata.src_node_id
            pid = by_node[node].partition_id if node in by_node else "?"
            log.warning("round %d: rejected reply of client %s: %s", server_round, pid, reason)
            if reply.has_error():
                failures += 1
            else:
                rejected.append({"client": pid, "reason": reason})
        failures += len(clients) - len(replies)
        train_loss = math.nan
        if len(accepted) >= self.config.min_clients:
            updates = []
            for reply in accepted:
                m = reply.content["metrics"]
                losses.append((float(m["train-loss"]), int(m["num-examples"])))
                if "norm" in reply.content:
                    updates.append(NormUpdate(int(m["context"]), int(m["num-examples"]),
                                              reply.content["norm"].to_torch_state_dict()))
                    del reply.content["norm"]
            arrays, _ = self.strategy.aggregate_train(server_round, accepted)
            if arrays is not None:
                new = arrays.to_torch_state_dict()
                self.shared = {k: new[k].to(self.reference[k].dtype) for k in self.split.shared}
            self.norm.update(updates)
            train_loss = sum(lo * n for lo, n in losses) / sum(n for _, n in losses)
        else:
            log.warning("round %d: only %d valid replies (< --min-clients %d); weights kept",
                        server_round, len(accepted), self.config.min_clients)
        # A client that trained holds its own normalization state from now on.
        self.trained.update(by_node[r.metadata.src_node_id].partition_id for r in replies
                            if not r.has_error() and r.metadata.src_node_id in by_node)
        record = {
            "round": server_round, "train_loss": train_loss, "clients_sampled": len(clients),
            "clients_ok": len(accepted) if len(accepted) >= self.config.min_clients else 0,
            "rejected": len(rejected), "failures": failures, "rejections": rejected,
            "ray_nodes": len({int(r.content["metrics"].get("ray-node", 0)) for r in accepted}),
            "seconds": time.time() - t0,
        }
        if server_round % self.config.eval_every == 0 or server_round == self.config.rounds:
            accs, per_client = self._evaluate(registry, grid, server_round)
            record.update(accuracy=self._overall(accs), accuracy_per_context=accs)
            if not self.policy.evaluates_on_server:
                record["accuracy_per_client"] = {str(p): a for p, a in per_client.items()}
                record["clients_evaluated"] = len(per_client)
            record["seconds"] = time.time() - t0
        return record

    def run(self, grid: Grid) -> None:
        history = self.load_checkpoint() if self.config.resume else []
        self.recorder.start(self.config.to_dict(), history)
        if not history:
            save_label_heatmap(self.rt.data, self.out / "label_counts.png")
        if history:
            self.recorder.say(f"Resuming from round {self.start_round - 1} in {self.out}")
        if hasattr(grid, "pull_interval"):  # Flower's in-memory grid polls every 0.1 s by default
            grid.pull_interval = 0.005
        registry = register_clients(grid, self.config.clients)
        self.recorder.startup_seconds = time.time() - self.recorder.started
        for server_round in range(self.start_round, self.config.rounds + 1):
            record = self.run_round(grid, registry, server_round)
            self.recorder.round(record)
            self.save_checkpoint(server_round)
        self.finish()

    def finish(self) -> None:
        last = self.recorder.history[-1]
        model_state = {"shared": self.shared, "norm": self.norm.state_dict(),
                       "norm_policy": str(self.policy), "context_names":
                       self.rt.data.context_names, "config": self.config.to_dict()}
        atomic_torch_save(model_state, self.out / "model.pt")
        self.recorder.finish({
            "accuracy": last["accuracy"], "accuracy_per_context": last["accuracy_per_context"],
            "rounds": last["round"], "final_train_loss": last["train_loss"],
            "contexts": self.rt.data.context_names, "real_domains": self.rt.data.real_domains,
            "missing_domains": list(getattr(self.rt.data, "missing_domains", [])),
            "clients": self.config.clients, "norm": self.config.norm,
            "norm_policy": self.config.norm_policy, "strategy": self.config.strategy,
            "seed": self.config.seed, "evaluated_on": "server" if
            self.policy.evaluates_on_server else "clients",
            "wall_seconds": time.time() - self.recorder.started,
            "startup_seconds": self.recorder.startup_seconds,
            **({} if self.policy.evaluates_on_server else {
                "accuracy_per_client": last["accuracy_per_client"],
                "clients_evaluated": last["clients_evaluated"]}),
        })


def make_server_app(config: SimConfig, recorder: RunRecorder) -> ServerApp:
    """Build the ``ServerApp``; errors are kept on ``recorder.error`` for the caller."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            Federation(config, recorder).run(grid)
        except BaseException as err:  # reported by fedctx.simulate after the engine stops
            recorder.error = err
            raise

    return app
