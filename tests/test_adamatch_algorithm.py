"""AdaMatch's pieces against hand-computed examples (Berthelot et al. 2021)."""

import math

import pytest
import torch
from torch import nn

from fedctx.adamatch import algorithm as A
from fedctx.models import make_model
from fedctx.norm import use_context


def test_interpolate_logits_per_logit_weights():
    joint = torch.tensor([[1.0, 2.0]])
    source_only = torch.tensor([[3.0, 0.0]])
    lam = torch.tensor([[0.5, 0.25]])
    # lam * source_only + (1 - lam) * joint = [0.5*3 + 0.5*1, 0.25*0 + 0.75*2]
    assert torch.allclose(A.interpolate_logits(joint, source_only, lam), torch.tensor([[2.0, 1.5]]))


def test_align_distribution_rescales_and_renormalises():
    probs = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    p_source = torch.tensor([0.75, 0.25])
    p_target = torch.tensor([0.5, 0.5])
    out = A.align_distribution(probs, p_source, p_target, eps=0.0)
    # row 1: [0.375, 0.125] / 0.5; row 2: [1.2, 0.1] / 1.3
    assert torch.allclose(out, torch.tensor([[0.75, 0.25], [1.2 / 1.3, 0.1 / 1.3]]))
    assert not out.requires_grad


def test_relative_threshold_and_mask():
    probs_source = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    c = A.relative_threshold(probs_source, tau=0.9)  # 0.9 * mean(0.9, 0.6)
    assert c.item() == pytest.approx(0.675)
    aligned = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.325, 0.675]])
    assert A.pseudo_label_mask(aligned, c).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (25, 0.5), (50, 1.0), (75, 1.0),
                                                (100, 1.0)])
def test_warmup_weight_cosine_over_first_half(step, expected):
    assert A.warmup_weight(step, 100) == pytest.approx(expected, abs=1e-12)


def test_cosine_lr_decays_to_quarter():
    assert A.cosine_lr(0, 100, 0.03) == pytest.approx(0.03)
    assert A.cosine_lr(100, 100, 0.03) == pytest.approx(0.0075)
    # cos(arccos(0.25) / 2) = sqrt((1 + 0.25) / 2)
    assert A.cosine_lr(50, 100, 0.03) == pytest.approx(0.03 * math.sqrt(0.625))


def test_running_estimates():
    ema = A.update_ema_vector(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]), decay=0.9)
    assert torch.allclose(ema, torch.tensor([0.55, 0.45]))
    history = torch.full((2, 2), 0.5)
    new, mean = A.update_moving_average(history, torch.tensor([1.0, 0.0]), step=3)
    assert new[1].tolist() == [1.0, 0.0] and new[0].tolist() == [0.5, 0.5]
    assert mean.tolist() == [0.75, 0.25]
    assert history[1].tolist() == [0.5, 0.5]  # input untouched


def test_adamatch_loss_hand_example():
    zeros = torch.zeros(2, 2)
    labels = torch.tensor([0, 1])
    target_strong = torch.tensor([[math.log(3.0), 0.0], [5.0, 0.0]])
    aligned = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # pseudo-labels 0 and 1
    mask = torch.tensor([1.0, 0.0])
    total, src, tgt = A.adamatch_loss(zeros, zeros, target_strong, labels, aligned, mask, 0.5)
    assert src.item() == pytest.approx(math.log(2.0))  # CE of uniform logits
    assert tgt.item() == pytest.approx(math.log(4.0 / 3.0) / 2)  # -log(3/4), one of two kept
    assert total.item() == pytest.approx(math.log(2.0) + 0.25 * math.log(4.0 / 3.0))


def test_mean_confidence_and_pseudo_label_loss_alone():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]], requires_grad=True)
    assert A.mean_confidence(probs).item() == pytest.approx(0.75)
    assert not A.mean_confidence(probs).requires_grad
    target_strong = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0]])
    aligned = torch.tensor([[0.2, 0.8], [0.9, 0.1]])  # pseudo-labels 1 and 0
    loss = A.pseudo_label_loss(target_strong, aligned, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(math.log(4.0 / 3.0) / 2)


def test_ema_update_params_and_buffers():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
        model.num_batches_tracked.fill_(7)
    A.ema_update_(ema, model, decay=0.75)
    assert ema.weight.tolist() == [1.5, 1.5]  # 0.75 * 1 + 0.25 * 3
    assert ema.running_mean.tolist() == [0.5, 0.5]
    assert ema.num_batches_tracked.item() == 7


def test_frozen_buffers_undo_running_stat_updates_but_keep_gradients():
    bn = nn.BatchNorm1d(3)
    x = torch.randn(8, 3) * 5 + 2
    before = A.snapshot_buffers(bn)
    out = bn(x)  # updates the running stats, as the joint pass
    after_joint = A.snapshot_buffers(bn)
    with A.frozen_buffers(bn):
        out2 = bn(x[:4])
    for b, s in zip(bn.buffers(), after_joint, strict=True):
        assert torch.equal(b, s)
    assert not torch.equal(after_joint[0], before[0])
    (out.sum() + out2.square().sum()).backward()  # restoring must not break autograd
    assert bn.weight.grad is not None


def test_domain_contexts():
    assert A.domain_contexts(2, 3).tolist() == [0, 0, 1, 1, 1]


def test_context_norm_makes_joint_source_logits_equal_source_only():
    """With per-domain statistics, the source half of the joint pass sees only source statistics,
    so it equals the source-only pass: random logit interpolation changes nothing for `context`;
    with `batch` the two differ (the paper's motivation)."""
    torch.manual_seed(0)  # >= 8 samples per domain: batch statistics at the FC layers too
    xs, xt = torch.randn(8, 3, 28, 28), torch.randn(10, 3, 28, 28) * 2 + 1
    for norm, same in (("context", True), ("batch", False)):
        model = make_model("digits-cnn", norm=norm, num_contexts=2, width=4).train()
        with use_context(model, A.domain_contexts(8, 10)):
            joint = model(torch.cat([xs, xt]))[:8]
        with A.frozen_buffers(model), use_context(model, 0):
            alone = model(xs)
        assert torch.allclose(joint, alone, atol=1e-5) is same
