"""ContextNorm (SBN / CN) against nn.BatchNorm computed separately per context."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedctx.norm import ContextNorm1d, ContextNorm2d, make_norm, use_context


def _run(m: nn.Module, x: torch.Tensor, g: torch.Tensor, ctx=None):
    x = x.clone().requires_grad_()
    with use_context(m, ctx) if ctx is not None else _null():
        y = m(x)
    y.backward(g)
    return y, x.grad


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


@pytest.mark.parametrize("dims,shape", [(0, (16, 5)), (1, (16, 5, 7)), (2, (16, 5, 4, 3))])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_one_context_equals_batchnorm(dims: int, shape: tuple[int, ...], as_tensor: bool) -> None:
    torch.manual_seed(0)
    x, g = torch.randn(shape) * 3 + 1, torch.randn(shape)
    bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](5)
    cn = make_norm("context", 5, dims=dims, num_contexts=1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        cn.weight.copy_(bn.weight)
        cn.bias.copy_(bn.bias)
    ctx = torch.zeros(shape[0], dtype=torch.long) if as_tensor else None
    for _ in range(3):
        y_ref, gx_ref = _run(bn, x, g)
        y, gx = _run(cn, x, g, ctx)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cn.weight.grad[0], bn.weight.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(cn.bias.grad[0], bn.bias.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(cn.running_mean[0], bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cn.running_var[0], bn.running_var, atol=1e-6, rtol=1e-6)
    assert int(cn.num_batches_tracked[0]) == int(bn.num_batches_tracked) == 3
    bn.eval()
    cn.eval()
    torch.testing.assert_close(cn(x), bn(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_k_contexts_equal_k_batchnorms_on_mixed_batch(shared: bool) -> None:
    torch.manual_seed(1)
    k, c = 3, 4
    ctx = torch.tensor([2, 0, 1, 0, 2, 2, 0, 1, 0, 2])
    x = torch.randn(10, c, 5, 5) * 2 - 1
    g = torch.randn_like(x)
    cn = ContextNorm2d(c, num_contexts=k, shared_affine=shared, momentum=0.3)
    with torch.no_grad():
        cn.weight.uniform_(0.5, 2)
        cn.bias.uniform_(-1, 1)
    bns = []
    for j in range(k):
        bn = nn.BatchNorm2d(c, momentum=0.3)
        with torch.no_grad():
            bn.weight.copy_(cn.weight if shared else cn.weight[j])
            bn.bias.copy_(cn.bias if shared else cn.bias[j])
        bns.append(bn)
    for _step in range(2):
        y, gx = _run(cn, x, g, ctx)
        y_ref, gx_ref = torch.empty_like(x), torch.empty_like(x)
        for j in range(k):
            sel = ctx == j
            y_ref[sel], gx_ref[sel] = _run(bns[j], x[sel], g[sel])
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    for j in range(k):
        torch.testing.assert_close(cn.running_mean[j], bns[j].running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cn.running_var[j], bns[j].running_var, atol=1e-6, rtol=1e-5)
    wgrad = torch.stack([b.weight.grad for b in bns])
    bgrad = torch.stack([b.bias.grad for b in bns])
    torch.testing.assert_close(cn.weight.grad, wgrad.sum(0) if shared else wgrad, atol=1e-4,
                               rtol=1e-5)
    torch.testing.assert_close(cn.bias.grad, bgrad.sum(0) if shared else bgrad, atol=1e-4,
                               rtol=1e-5)
    assert cn.num_batches_tracked.tolist() == [2, 2, 2]
    # eval: per-context running statistics, on a mixed batch and a single int context
    cn.eval()
    for b in bns:
        b.eval()
    with torch.no_grad(), use_context(cn, ctx):
        y = cn(x)
    y_ref = torch.empty_like(x)
    for j in range(k):
        y_ref[ctx == j] = bns[j](x[ctx == j]).detach()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), use_context(cn, 1):
        torch.testing.assert_close(cn(x), bns[1](x).detach(), atol=1e-5, rtol=1e-5)


def test_absent_context_keeps_running_stats_and_gradcheck() -> None:
    cn = ContextNorm2d(3, num_contexts=4)
    x = torch.randn(6, 3, 2, 2)
    with use_context(cn, torch.tensor([0, 0, 1, 1, 3, 3])):
        cn(x)
    assert torch.equal(cn.running_mean[2], torch.zeros(3))
    assert torch.equal(cn.running_var[2], torch.ones(3))
    assert cn.num_batches_tracked.tolist() == [1, 1, 0, 1]
    from fedctx.norm.functional import _GroupedBatchNorm

    xd = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 3, 0, 1, 3, 3])
    assert torch.autograd.gradcheck(
        lambda x, w, b: _GroupedBatchNorm.apply(x, ids, 4, 3, w, b, 1e-5)[0], (xd, w, b)
    )


def test_eval_without_context_uses_mean_of_entries() -> None:
    torch.manual_seed(2)
    cn = ContextNorm2d(3, num_contexts=2)
    with torch.no_grad():
        cn.running_mean.uniform_(-1, 1)
        cn.running_var.uniform_(0.5, 2)
        cn.weight.uniform_(0.5, 2)
        cn.bias.uniform_(-1, 1)
    cn.eval()
    x = torch.randn(1, 3, 4, 4)
    ref = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        ref.running_mean.copy_(cn.running_mean.mean(0))
        ref.running_var.copy_(cn.running_var.mean(0))
        ref.weight.copy_(cn.weight.mean(0))
        ref.bias.copy_(cn.bias.mean(0))
        torch.testing.assert_close(cn(x), ref(x))


def test_missing_or_bad_context_raises() -> None:
    cn = ContextNorm2d(3, num_contexts=2)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="no context was set"):
        cn(x)
    with pytest.raises(RuntimeError, match="out of range"), use_context(cn, 2):
        cn(x)
    with pytest.raises(RuntimeError, match="0..1"), use_context(cn, torch.tensor([0, 1, 2, 0])):
        cn(x)
    with pytest.raises(RuntimeError, match="shape"), use_context(cn, torch.tensor([0, 1])):
        cn(x)


def test_authors_defaults_and_state_dict_shapes() -> None:
    cn = make_norm("context", 8, dims=0, num_contexts=5, eps=1e-3, momentum=0.01)
    sd = cn.state_dict()
    assert sd["running_mean"].shape == (5, 8) and sd["weight"].shape == (5, 8)
    assert sd["num_batches_tracked"].dtype == torch.long and sd["num_batches_tracked"].shape == (5,)
    clone = copy.deepcopy(cn)
    clone.load_state_dict(sd)


def test_context_with_one_value_per_channel_uses_and_keeps_running_stats() -> None:
    """A context holding one sample at a layer without spatial positions has zero batch
    variance: it is normalized with its running statistics, which it leaves unchanged (averaging
    a zero variance in drove evaluation of mixed-domain clients to 1/sqrt(eps) scale), even
    under the paper's rule (``min_batch_values=2``), where 5 samples get batch statistics."""
    torch.manual_seed(0)
    cn = ContextNorm1d(4, num_contexts=2, min_batch_values=2)
    with torch.no_grad():
        cn.running_mean.copy_(torch.randn(2, 4))
        cn.running_var.copy_(torch.rand(2, 4) + 0.5)
        cn.weight.copy_(torch.randn(2, 4))
        cn.bias.copy_(torch.randn(2, 4))
    before = {k: v.clone() for k, v in cn.state_dict().items()}
    x = torch.randn(6, 4)
    ctx = torch.tensor([0, 0, 0, 1, 0, 0])
    y, _ = _run(cn, x, torch.ones(6, 4), ctx)
    assert torch.equal(cn.running_mean[1], before["running_mean"][1])
    assert torch.equal(cn.running_var[1], before["running_var"][1])
    assert cn.num_batches_tracked.tolist() == [1, 0]
    assert not torch.equal(cn.running_var[0], before["running_var"][0])
    lone = (x[3] - before["running_mean"][1]) / torch.sqrt(before["running_var"][1] + cn.eps)
    torch.testing.assert_close(y[3], lone * before["weight"][1] + before["bias"][1])
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(before["weight"][0])
        bn.bias.copy_(before["bias"][0])
    torch.testing.assert_close(y[ctx == 0], bn(x[ctx == 0]).detach())
