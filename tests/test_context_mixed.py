"""Context norm on clients whose mini-batches mix contexts (docs/results/domain_mix.md): the
few-sample property of per-context batch statistics, and ``min_batch_values``, which normalizes
such contexts with their running statistics instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedctx.norm import ContextNorm1d, ContextNorm2d, use_context


def test_two_samples_of_a_context_at_a_flat_layer_keep_only_a_sign() -> None:
    """With ``N_k = 2`` values per channel the normalized pair is ``(+1, -1)`` per channel
    whatever the inputs, and the input gradient vanishes (up to ``eps``): the property behind the
    slow training of mixed batches, not a defect of the layer (the paper's rule,
    ``min_batch_values=2``)."""
    torch.manual_seed(0)
    norm = ContextNorm1d(16, num_contexts=2, affine=False, min_batch_values=2)
    x = (10 * torch.randn(10, 16)).requires_grad_(True)
    contexts = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 0])  # context 0: samples 0 and 9
    with use_context(norm, contexts):
        out = norm(x)
    (out * torch.randn_like(out)).sum().backward()
    pair = out[[0, 9]].detach()
    torch.testing.assert_close(pair.abs(), torch.ones_like(pair), atol=1e-4, rtol=0)
    torch.testing.assert_close(pair[0], -pair[1])
    lone_grad = x.grad[[0, 9]].abs().max()
    assert lone_grad < 1e-3 * x.grad[1:9].abs().max()


def test_by_default_a_few_sample_context_uses_its_running_statistics() -> None:
    """fedctx's default (8 values per channel): the pair of the test above is normalized with
    context 0's running statistics (initially 0 and 1), which stay as they were, while the
    8 samples of context 1 use their batch statistics."""
    torch.manual_seed(0)
    norm = ContextNorm1d(16, num_contexts=2, affine=False)
    x = 10 * torch.randn(10, 16)
    contexts = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    with use_context(norm, contexts):
        out = norm(x)
    torch.testing.assert_close(out[[0, 9]], x[[0, 9]] / torch.sqrt(torch.tensor(1.0 + 1e-5)))
    torch.testing.assert_close(norm.running_mean[0], torch.zeros(16))
    torch.testing.assert_close(norm.running_var[0], torch.ones(16))
    ones = out[1:9]
    torch.testing.assert_close(ones.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    assert not torch.allclose(norm.running_mean[1], torch.zeros(16))


def test_near_equal_pair_spikes_the_gradient_unless_min_batch_values() -> None:
    """Two samples of a context whose features nearly coincide: the batch variance is near
    ``eps`` and the input gradient is multiplied by up to ``1/sqrt(eps)``; with
    ``min_batch_values=4`` the pair is normalized by its running statistics (gradient
    ``weight / sqrt(running_var + eps)`` times the output gradient)."""
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    x[9] = x[0] + 3e-3  # context 0: samples 0 and 9, nearly equal
    contexts = torch.tensor([0] + [1] * 8 + [0])
    g = torch.randn(10, 8)
    grads = {}
    for min_values in (2, 4):
        norm = ContextNorm1d(8, num_contexts=2, min_batch_values=min_values)
        xi = x.clone().requires_grad_(True)
        with use_context(norm, contexts):
            (norm(xi) * g).sum().backward()
        grads[min_values] = xi.grad
    typical = grads[2][1:9].abs().max()
    assert grads[2][[0, 9]].abs().max() > 30 * typical
    expected = g[[0, 9]] / torch.sqrt(torch.tensor(1.0 + 1e-5))  # running stats (0, 1), weight 1
    torch.testing.assert_close(grads[4][[0, 9]], expected)


def test_min_batch_values_counts_values_and_keeps_running_stats() -> None:
    """A context with fewer than ``min_batch_values`` values per channel (samples times spatial
    positions) uses and keeps its running statistics; the others are each context's BatchNorm."""
    torch.manual_seed(0)
    flat = ContextNorm1d(4, num_contexts=3, min_batch_values=4)
    with torch.no_grad():
        flat.running_mean.copy_(torch.randn(3, 4))
        flat.running_var.copy_(torch.rand(3, 4) + 0.5)
    before = flat.running_mean.clone(), flat.running_var.clone()
    x = torch.randn(12, 4)
    contexts = torch.tensor([0] * 7 + [1] * 3 + [2] * 2)[torch.randperm(12)]
    with use_context(flat, contexts), torch.no_grad():
        y = flat(x)
    for k in (1, 2):  # 3 and 2 values: running statistics, unchanged
        sel = contexts == k
        want = (x[sel] - before[0][k]) / torch.sqrt(before[1][k] + flat.eps)
        torch.testing.assert_close(y[sel], want)
        assert torch.equal(flat.running_mean[k], before[0][k])
        assert torch.equal(flat.running_var[k], before[1][k])
    bn = nn.BatchNorm1d(4)
    torch.testing.assert_close(y[contexts == 0], bn(x[contexts == 0]).detach())
    assert flat.num_batches_tracked.tolist() == [1, 0, 0]
    conv = ContextNorm2d(3, num_contexts=2, min_batch_values=4)  # 2 samples x 2x2 positions
    images, pair = torch.randn(6, 3, 2, 2), torch.tensor([0, 0, 1, 1, 1, 1])
    with use_context(conv, pair), torch.no_grad():
        out = conv(images)
    torch.testing.assert_close(out[:2], nn.BatchNorm2d(3)(images[:2]).detach())


@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_min_batch_values_below_two_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="min_batch_values"):
        ContextNorm1d(4, num_contexts=2, min_batch_values=bad)
