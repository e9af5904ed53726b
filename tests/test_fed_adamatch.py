"""Federated domain adaptation (#12 item 3): the unlabelled client's AdaMatch objective, its
metrics, and that it never reads a label."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message, MessageType

from fedctx.adamatch import algorithm as A
from fedctx.data import ClientData
from fedctx.federated import unlabelled as U
from fedctx.models import make_model
from fedctx.norm import use_context


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_model("digits-cnn", norm="context", num_contexts=2, num_classes=10, width=4)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class LabelFree(ClientData):
    """Client data whose labels cannot be read: any access to ``y`` fails the test."""

    @property
    def y(self) -> torch.Tensor:
        raise AssertionError("the unlabelled client read a label")


def label_free(x: torch.Tensor, context: int) -> LabelFree:
    data = object.__new__(LabelFree)  # no __init__: it would store (and check) y
    object.__setattr__(data, "x", x)
    object.__setattr__(data, "contexts", torch.full((len(x),), context, dtype=torch.long))
    return data


def test_batch_loss_equals_adamatch_pieces_by_hand() -> None:
    torch.set_num_threads(1)
    model = small_model()
    teacher = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    x = images(16)
    weak, strong = U.weak_view(x, gen), U.strong_view(x, gen)
    teacher_weak = U.train_mode_probs(teacher, weak, 1)
    p_source = torch.softmax(torch.randn(10, generator=gen), 0)  # a label distribution
    p_target = teacher_weak.mean(0)
    aligned = A.align_distribution(teacher_weak, p_source, p_target)
    # a threshold between the aligned confidences, so the mask keeps some and drops some
    cutoff = aligned.max(1).values.median()
    loss, mask = U.unlabelled_batch_loss(model, weak, strong, 1, teacher_weak, p_source,
                                         p_target, cutoff)

    model.train()
    with use_context(model, 1):
        strong_logits = model(torch.cat([weak, strong]))[16:]
    expected_mask = (aligned.max(1).values >= cutoff).float()
    per_sample = F.cross_entropy(strong_logits, aligned.argmax(1), reduction="none").detach()
    assert 0 < expected_mask.sum() < 16
    assert torch.equal(mask, expected_mask)
    assert loss.detach().item() == pytest.approx(float((per_sample * expected_mask).sum() / 16),
                                                 rel=1e-5)
    assert loss.requires_grad


def test_teacher_probs_leave_buffers_and_the_threshold_falls_back_to_tau() -> None:
    model = small_model()
    before = [b.clone() for b in model.buffers()]
    probs = U.train_mode_probs(model, images(8), 1)
    assert torch.allclose(probs.sum(1), torch.ones(8)) and not probs.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    assert U.threshold(None).item() == pytest.approx(U.TAU)
    assert U.threshold(0.8, tau=0.9).item() == pytest.approx(0.72)


def _train(data: ClientData, **kwargs) -> tuple[torch.nn.Module, float, float]:
    torch.set_num_threads(1)
    model = small_model()
    loss, rate = U.unlabelled_train(model, data, epochs=1, batch_size=16, lr=0.05, momentum=0.9,
                                    weight_decay=0.0, generator=torch.Generator().manual_seed(1),
                                    num_classes=10, **kwargs)
    return model, loss, rate


def test_unlabelled_training_never_reads_a_label_and_learns_its_context_statistics() -> None:
    data = label_free(images(48), context=1)
    model, loss, rate = _train(data, source_confidence=0.0)  # threshold 0: every image kept
    assert rate == 1.0 and loss > 0
    fresh = small_model().state_dict()
    state = model.state_dict()
    stats = [k for k in state if k.endswith("running_mean")]
    assert stats
    # context 1's statistics moved towards the client's images; context 0's did not
    assert all(not torch.equal(state[k][1], fresh[k][1]) for k in stats)
    assert all(torch.equal(state[k][0], fresh[k][0]) for k in stats)
    assert any(not torch.equal(state[k], fresh[k]) for k in state if k.endswith("weight"))


def test_absent_label_distribution_is_uniform_and_threshold_masks() -> None:
    data = label_free(images(48), context=1)
    uniform, loss_u, rate_u = _train(data)
    explicit, loss_e, rate_e = _train(data, label_distribution=[0.1] * 10)
    assert loss_u == loss_e and rate_u == rate_e
    assert all(torch.equal(a, b) for a, b in zip(uniform.state_dict().values(),
                                                 explicit.state_dict().values(), strict=True))
    # round 1 (no source confidence): threshold tau = 0.9 keeps almost nothing of a fresh model
    assert rate_u < 0.5
    skewed, loss_s, _ = _train(data, label_distribution=[0.91] + [0.01] * 9, source_confidence=0.0)
    assert loss_s != loss_u


class Recorder:
    """Wraps a ClientApp; keeps each reply's metrics by (message type, partition id)."""

    def __init__(self, inner) -> None:
        self.inner, self.metrics = inner, {}

    def __call__(self, msg: Message, context) -> Message:
        reply = self.inner(msg, context)
        pid = int(context.node_config["partition-id"])
        if not reply.has_error() and "metrics" in reply.content:
            self.metrics.setdefault((msg.metadata.message_type, pid), []).append(
                dict(reply.content["metrics"]))
        if msg.metadata.message_type == MessageType.TRAIN and "config" in msg.content:
            self.metrics.setdefault(("config", pid), []).append(dict(msg.content["config"]))
        return reply


@pytest.mark.slow  # a 2-round federation end to end: ~7 s alone
def test_client_app_with_unlabelled_clients(tmp_path: Path) -> None:
    from fedctx.config import SimConfig
    from fedctx.federated.client import app as client_app
    from fedctx.federated.local import InProcessGrid
    from fedctx.federated.run_config import to_run_config
    from fedctx.federated.runtime import get_runtime
    from fedctx.federated.server import Experiment
    from fedctx.results import RunRecorder

    torch.set_num_threads(1)
    config = SimConfig(clients=4, rounds=2, fraction=1.0, min_clients=2, width=4, batch_size=32,
                       out=str(tmp_path / "run"), backend="inprocess").validate()
    run_config = to_run_config(config)
    rt = get_runtime(run_config)
    target = 1
    for pid, c in enumerate(rt.data.clients):  # the clients of context 1 lose their labels
        if c.context == target:
            rt.data.clients[pid] = ClientData(c.x, None, c.contexts)
    rt.data.unlabelled_domains.append(rt.data.context_names[target])  # as the scenario says
    unlabelled = {pid for pid, c in enumerate(rt.data.clients) if c.y is None}
    assert unlabelled and len(unlabelled) < len(rt.data.clients)
    app = Recorder(client_app)
    Experiment(config, run_config, RunRecorder(Path(config.out), config.rounds)).run(
        InProcessGrid(app, config.clients, run_config=run_config))

    k = rt.data.num_contexts
    counts = sum(torch.bincount(c.y, minlength=10) for c in rt.data.clients if c.y is not None)
    for pid in unlabelled:  # what the server sent them: round 1 without confidence, round 2 with
        first, second = app.metrics[("config", pid)]
        assert first["label-distribution"] == pytest.approx((counts / counts.sum()).tolist())
        assert "source-confidence" not in first and 0 < second["source-confidence"] <= 1
    for pid, client in enumerate(rt.data.clients):
        (query,) = app.metrics[(MessageType.QUERY, pid)]
        if pid in unlabelled:
            assert "label-counts" not in query
        else:
            assert query["label-counts"] == torch.bincount(client.y, minlength=10).tolist()
        for m in app.metrics[(MessageType.TRAIN, pid)]:
            assert m["context-counts"] == client.context_counts(k).tolist()
            assert len(m["context-counts"]) == k
            if pid in unlabelled:
                assert 0.0 <= m["unlabelled-mask-rate"] <= 1.0 and "confidence" not in m
            else:
                assert 0.1 <= m["confidence"] <= 1.0 and "unlabelled-mask-rate" not in m
