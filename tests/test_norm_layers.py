"""Every non-torch layer against a reference computed another way (loops, float64, torch ops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedctx.norm as fn
from fedctx.norm import (
    AdaptiveContextNorm,
    BatchGroupNorm,
    ConditionalInstanceNorm,
    CrossIterationBatchNorm,
    GhostBatchNorm,
    MixtureNorm,
    ProxyNorm,
    UnsupervisedAdaptiveNorm,
    WSConv2d,
    fit_gmm,
    make_norm,
    use_context,
)


def test_acn_matches_per_sample_loop_and_is_batch_independent() -> None:
    torch.manual_seed(0)
    m = AdaptiveContextNorm(4, num_contexts=3).double()
    ctx = torch.tensor([2, 0, 1, 1, 0])
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with use_context(m, ctx):
        y = m(x)
    ref = torch.stack([
        (x[i] - m.mean[k].view(4, 1, 1)) / (torch.exp(m.log_scale[k]).view(4, 1, 1) + 1e-3)
        for i, k in enumerate(ctx.tolist())
    ])
    torch.testing.assert_close(y, ref)
    with use_context(m, ctx[:1]):
        y0 = m(x[:1])
    torch.testing.assert_close(y0, y[:1])
    bound = math.sqrt(6 / (3 + 4))
    assert m.mean.abs().max() <= bound and m.log_scale.abs().max() <= bound
    m.eval()
    with torch.no_grad():
        y = m(x)
    ref = (x - m.mean.mean(0).view(1, 4, 1, 1)) / (
        torch.exp(m.log_scale.mean(0)).view(1, 4, 1, 1) + 1e-3)
    torch.testing.assert_close(y, ref)
    y.sum()  # no grad needed
    assert m.weight is None
    m2 = AdaptiveContextNorm(4, num_contexts=3, affine=True)
    assert m2.weight.shape == (3, 4)


def _uan_reference(
    x: torch.Tensor, m: UnsupervisedAdaptiveNorm, denom_eps: float
) -> torch.Tensor:
    """Authors' formula (``denom_eps=eps``: literally), a loop over components, float64."""
    eps = m.eps
    pi, mu, v = m.prior.double().detach(), m.mean.double().detach(), m.var.double().detach()
    g = []
    for k in range(m.num_components):
        g.append(pi[k] * torch.exp(-(x - mu[k].view(1, -1, 1, 1)) ** 2
                                   / (2 * (v[k].view(1, -1, 1, 1) + eps))))
    total = sum(g)
    out = 0
    for k in range(m.num_components):
        tau = g[k] / (total + denom_eps)
        out = out + tau / math.sqrt(pi[k] + eps) * (x - mu[k].view(1, -1, 1, 1)) / torch.sqrt(
            v[k].view(1, -1, 1, 1) + eps)
    w, b = m.weight.double().detach(), m.bias.double().detach()
    return out * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def test_uan_matches_authors_formula_and_init() -> None:
    torch.manual_seed(0)
    m = UnsupervisedAdaptiveNorm(6, num_components=3, moments="learned")
    assert m.assignment == "authors"
    assert m.mean.min() >= -1 and m.mean.max() <= 1
    assert m.var_raw.min() >= 1e-3 and m.var_raw.max() <= 1e-2
    # the authors' prior init: U(0.01, 0.99) divided by its sum, then softmax in the forward
    torch.testing.assert_close(m.prior_raw.sum(), torch.tensor(1.0))
    assert m.prior_raw.min() > 0 and m.prior_raw.max() / m.prior_raw.min() <= 99
    torch.testing.assert_close(m.prior.sum(), torch.tensor(1.0))
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.bias.uniform_(-1, 1)
    x = torch.randn(4, 6, 3, 3) * 2
    y = m(x)
    # default: the authors' literal formula, eps in the denominator of tau
    torch.testing.assert_close(y.double(), _uan_reference(x.double(), m, m.eps), atol=1e-5,
                               rtol=1e-5)
    soft = UnsupervisedAdaptiveNorm(6, num_components=3, moments="learned",
                                    assignment="softmax")
    soft.load_state_dict(m.state_dict())
    torch.testing.assert_close(soft(x).double(), _uan_reference(x.double(), m, 0.0), atol=1e-5,
                               rtol=1e-5)
    assert (soft(x) - y).abs().max() > 1e-3  # the two assignments are different functions
    with pytest.raises(ValueError, match="authors, softmax"):
        UnsupervisedAdaptiveNorm(6, assignment="nope")
    # batch-size independent and identical in eval
    torch.testing.assert_close(m(x[2:3]), y[2:3])
    m.eval()
    torch.testing.assert_close(m(x), y)
    # gradients reach every parameter
    m.train()
    m(x).square().sum().backward()
    for p in (m.mean, m.var_raw, m.prior_raw, m.weight, m.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_uan_far_activation_stays_finite_and_assigned() -> None:
    soft = UnsupervisedAdaptiveNorm(2, affine=False, moments="learned", assignment="softmax")
    x = torch.full((1, 2, 1, 1), 50.0, requires_grad=True)
    assert torch.isfinite(soft(x)).all() and soft(x).abs().min() > 1.0
    authors = UnsupervisedAdaptiveNorm(2, affine=False, moments="learned")
    y = authors(x)  # the authors' eps in the denominator: tau -> 0 far from every component
    assert torch.isfinite(y).all() and y.abs().max() < 1e-6
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in authors.parameters() if p.grad is not None)


def test_uan_assignments_differ_on_about_six_percent_at_init() -> None:
    """The figure quoted in the docs: ``sum_k tau_k`` off by > 1 % on ~6 % of N(0, 1) values."""
    torch.manual_seed(0)
    m = UnsupervisedAdaptiveNorm(64, moments="learned")
    x = torch.randn(256, 64, 1, 1)
    from fedctx.norm.uan import _assign

    tau = _assign(x.view(256, 1, 64, 1), m.mean, m.var, m.prior, m.eps).detach()
    share = float((tau.sum(1) < 0.99).float().mean())
    assert 0.03 < share < 0.09


def test_scb_is_acn() -> None:
    """SCB-Norm is ACN's computation (the authors' code): one class, near identity at init."""
    assert fn.SupervisedClusterNorm is AdaptiveContextNorm
    torch.manual_seed(3)
    scb = make_norm("scb", 16, num_contexts=4)
    torch.manual_seed(3)
    acn = make_norm("acn", 16, num_contexts=4)
    assert type(scb) is AdaptiveContextNorm
    x, ctx = torch.randn(6, 16, 3, 3), torch.tensor([0, 1, 2, 3, 1, 0])
    with use_context(scb, ctx), use_context(acn, ctx):
        torch.testing.assert_close(scb(x), acn(x))
    # near identity at init: |mu| and |log scale| within Xavier's bound sqrt(6 / (K + C)) = 0.55
    # (the Gaussian-mixture layer `scb` named before scaled by ~1.7 and shifted by up to 1)
    bound = math.sqrt(6 / (4 + 16))
    assert scb.mean.abs().max() <= bound and scb.log_scale.abs().max() <= bound
    with use_context(scb, ctx):
        y = scb(x)
    ratio = (y.std() / x.std()).item()
    assert math.exp(-bound) < ratio < math.exp(bound)


def _em_reference(data: torch.Tensor, k: int, iters: int):
    """Plain EM on one channel's values (float64, loop over components)."""
    m0, s0 = data.mean(), data.std(unbiased=False)
    z = [math.sqrt(2) * torch.erfinv(torch.tensor(2 * (j + 0.5) / k - 1)).item() for j in range(k)]
    mu = torch.tensor([m0 + zj * s0 for zj in z])
    var = torch.full((k,), float(s0 ** 2 / k))
    pi = torch.full((k,), 1.0 / k)
    for _ in range(iters):
        dens = torch.stack([pi[j] * torch.exp(-(data - mu[j]) ** 2 / (2 * var[j]))
                            / torch.sqrt(2 * math.pi * var[j]) for j in range(k)])
        r = dens / dens.sum(0)
        nk = r.sum(1)
        mu = (r * data).sum(1) / nk
        var = torch.stack([(r[j] * (data - mu[j]) ** 2).sum() / nk[j] for j in range(k)])
        pi = nk / data.numel()
    return pi, mu, var


def test_mixture_em_matches_reference_and_finds_modes() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(32, 3, 4, 4) - 4, torch.randn(32, 3, 4, 4) + 4]).double()
    prior, mean, var = fit_gmm(x.flatten(2), 2, iters=4, max_samples=None)
    for c in range(3):
        pi_r, mu_r, var_r = _em_reference(x[:, c].flatten(), 2, 4)
        torch.testing.assert_close(prior[:, c], pi_r)
        torch.testing.assert_close(mean[:, c], mu_r)
        torch.testing.assert_close(var[:, c], var_r)
    assert (mean[0] < -3).all() and (mean[1] > 3).all()


def test_mixture_one_component_is_batchnorm_and_eval_runs() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    mn = MixtureNorm(4, num_components=1)
    bn = nn.BatchNorm2d(4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    ya, yb = mn(xa), bn(xb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mn.running_mean[0], bn.running_mean)
    mn2 = MixtureNorm(4, num_components=3)
    for _ in range(3):
        mn2(x)
    mn2.eval()
    y1 = mn2(x[:1])
    assert y1.shape == (1, 4, 3, 3) and torch.isfinite(y1).all()
    torch.testing.assert_close(mn2(x)[:1], y1)


def test_proxy_moments_match_numerical_integral_and_composition() -> None:
    torch.manual_seed(0)
    m = ProxyNorm(8, num_groups=4, n_quantiles=4096)
    with torch.no_grad():
        for p in (m.weight, m.bias, m.proxy_weight, m.proxy_bias):
            p.uniform_(-0.5, 0.5)
        m.weight.add_(1)
    from fedctx.norm.proxy import proxy_moments

    mean, var = proxy_moments(F.relu, m.weight, m.bias, m.proxy_weight, m.proxy_bias,
                              m.quantiles)
    u = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    pdf = torch.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi)
    for c in range(8):
        a = F.relu(m.weight[c].double() * (m.proxy_bias[c].double()
                   + (1 + m.proxy_weight[c].double()) * u) + m.bias[c].double())
        e = torch.trapezoid(a * pdf, u)
        v = torch.trapezoid((a - e) ** 2 * pdf, u)
        assert abs(mean[c].item() - e.item()) < 2e-3
        assert abs(var[c].item() - v.item()) < 2e-3
    x = torch.randn(5, 8, 4, 4)
    gn = nn.GroupNorm(4, 8, affine=False)
    z = F.relu(gn(x) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1))
    ref = (z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 0.03)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x[:1]), m(x)[:1])  # batch independent
    assert ProxyNorm(8, base="layer").num_groups == 1
    with pytest.raises(ValueError, match="relu"):
        ProxyNorm(8, activation="nope")


def test_ghost_matches_chunked_batchnorm() -> None:
    torch.manual_seed(0)
    x, g = torch.randn(10, 3, 4, 4), torch.randn(10, 3, 4, 4)
    m = GhostBatchNorm(3, virtual_batch_size=4)
    xa = x.clone().requires_grad_()
    y = m(xa)
    y.backward(g)
    ref, gref, means, vars_ = [], [], [], []
    for chunk, gc in zip(x.split(4), g.split(4), strict=True):
        xc = chunk.clone().requires_grad_()
        bn = nn.BatchNorm2d(3)
        yc = bn(xc)
        yc.backward(gc)
        ref.append(yc)
        gref.append(xc.grad)
        means.append(chunk.mean((0, 2, 3)))
        vars_.append(chunk.var((0, 2, 3)))
    torch.testing.assert_close(y, torch.cat(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, torch.cat(gref), atol=1e-5, rtol=1e-5)
    # the authors' code: a plain BatchNorm run on each ghost batch in turn
    seq = nn.BatchNorm2d(3)
    for chunk in x.split(4):
        seq(chunk)
    torch.testing.assert_close(m.running_mean, seq.running_mean)
    torch.testing.assert_close(m.running_var, seq.running_var)
    mean_rule = GhostBatchNorm(3, virtual_batch_size=4, running_stats="mean")
    mean_rule(x)
    torch.testing.assert_close(mean_rule.running_mean, 0.1 * torch.stack(means).mean(0))
    torch.testing.assert_close(mean_rule.running_var, 0.9 + 0.1 * torch.stack(vars_).mean(0))
    small = GhostBatchNorm(3, virtual_batch_size=16)
    torch.testing.assert_close(small(x), nn.BatchNorm2d(3)(x))


def test_batchgroup_matches_manual_and_batchnorm() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 8, 3, 3) * 2 + 0.5
    m = BatchGroupNorm(8, num_groups=2)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.bias.uniform_(-1, 1)
    xg = x.view(6, 2, 4, 3, 3)
    mu = xg.mean((0, 2, 3, 4), keepdim=True)
    var = xg.var((0, 2, 3, 4), unbiased=False, keepdim=True)
    ref = ((xg - mu) / torch.sqrt(var + 1e-5)).view_as(x) * m.weight.view(1, -1, 1, 1) \
        + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.running_mean, 0.1 * mu.flatten())
    torch.testing.assert_close(BatchGroupNorm(8, num_groups=8)(x), nn.BatchNorm2d(8)(x))
    m.eval()
    assert m(x[:1]).shape == (1, 8, 3, 3)
    with pytest.raises(ValueError, match="divide"):
        BatchGroupNorm(8, num_groups=3)


def test_crossiter_window_equals_batchnorm_of_concatenation() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5) + 1, torch.randn(4, 3, 5, 5) * 2
    one = CrossIterationBatchNorm(3, window=1)
    torch.testing.assert_close(one(b), nn.BatchNorm2d(3)(b), atol=1e-5, rtol=1e-5)
    m = CrossIterationBatchNorm(3, window=2)
    m(a)
    y = m(b)
    both = torch.cat([a, b])
    mu = both.mean((0, 2, 3)).view(1, -1, 1, 1)
    var = both.var((0, 2, 3), unbiased=False).view(1, -1, 1, 1)
    torch.testing.assert_close(y, (b - mu) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    burn = CrossIterationBatchNorm(3, window=2, burnin=5)
    burn(a)
    torch.testing.assert_close(burn(b), nn.BatchNorm2d(3)(b), atol=1e-5, rtol=1e-5)
    xb = b.clone().requires_grad_()
    m(xb).sum().backward()
    assert torch.isfinite(xb.grad).all()
    m.eval()
    assert m(b[:1]).shape == (1, 3, 5, 5)


def test_crossiter_running_stats_follow_the_current_batch_by_default() -> None:
    """The authors' CBatchNorm2d updates running statistics from the current batch only."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5) + 3, torch.randn(4, 3, 5, 5) * 2
    m, bn = CrossIterationBatchNorm(3, window=2), nn.BatchNorm2d(3)
    for t in (a, b):
        m(t)
        bn(t)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    w = CrossIterationBatchNorm(3, window=2, running_stats="window")
    w(a)
    w(b)
    both = torch.cat([a, b])
    assert abs(float(w.running_mean[0]) - float(bn.running_mean[0])) > 0.05
    torch.testing.assert_close(w.running_mean, 0.9 * 0.1 * a.mean((0, 2, 3))
                               + 0.1 * both.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)


def test_crossiter_history_is_transient() -> None:
    """History buffers are not state: not in state_dict (never aggregated), reset on load."""
    from fedctx.federated.params import split_state
    from fedctx.models import make_model

    m = CrossIterationBatchNorm(3, window=3)
    assert not {"hist_mean", "hist_sqmean", "hist_valid"} & set(m.state_dict())
    m(torch.randn(4, 3, 2, 2))
    assert bool(m.hist_valid.any())
    m.load_state_dict(m.state_dict())  # e.g. a new round's weights: stale history is dropped
    assert not bool(m.hist_valid.any()) and float(m.hist_mean.abs().sum()) == 0
    model = make_model("digits-cnn", norm="crossiter", width=4)
    split = split_state(model)
    keys = set(split.shared) | set(split.norm)
    assert keys == set(model.state_dict())
    assert not [k for k in keys if ".hist_" in k]
    assert {k.rsplit(".", 1)[1] for k in split.norm_stats} == {
        "running_mean", "running_var", "num_batches_tracked"}


def test_weightstd_conv_and_groupnorm_side() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach().double().numpy()
    w_hat = (w - w.mean(axis=(1, 2, 3), keepdims=True)) / (
        w.std(axis=(1, 2, 3), keepdims=True) ** 2 + 1e-6) ** 0.5
    ref = F.conv2d(x.double(), torch.from_numpy(w_hat), padding=1)
    torch.testing.assert_close(conv(x).double(), ref, atol=1e-5, rtol=1e-5)
    gn = make_norm("weightstd", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    from fedctx.norm import convert_ws_convs

    model = convert_ws_convs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert isinstance(model[0], WSConv2d)


def test_adain_per_context_affine() -> None:
    torch.manual_seed(0)
    m = ConditionalInstanceNorm(3, num_contexts=2)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 5, 5)
    ctx = torch.tensor([1, 0, 1, 1])
    with use_context(m, ctx):
        y = m(x)
    mu = x.mean((2, 3), keepdim=True)
    var = x.var((2, 3), unbiased=False, keepdim=True)
    xh = (x - mu) / torch.sqrt(var + 1e-5)
    ref = xh * m.weight[ctx].view(4, 3, 1, 1) + m.bias[ctx].view(4, 3, 1, 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    m.eval()
    ref = xh * m.weight.mean(0).view(1, 3, 1, 1) + m.bias.mean(0).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dims"):
        make_norm("adain", 3, dims=0, num_contexts=2)
