"""fedctx.norm.functional: the closed-form kernels against the previous autograd-composed
implementations (outputs and every gradient, float64), gradcheck of every custom backward,
device/dtype constructors, and which modules count as normalization."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedctx.norm.factory as factory
import fedctx.norm.functional as NF
from fedctx.federated.params import split_state
from fedctx.norm import (
    AdaptiveContextNorm,
    BatchGroupNorm,
    ConditionalInstanceNorm,
    CrossIterationBatchNorm,
    ProxyNorm,
    available,
    convert_norms,
    is_norm_module,
    make_norm,
    register_norm,
    use_context,
)
from fedctx.optim import decayed_parameters

D = torch.float64


def _grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor, ctx: object = None):
    """Output, input gradient and parameter gradients of ``module`` on ``x`` for ``g``."""
    xi = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with use_context(module, ctx):
        y = module(xi)
    y.backward(g)
    return y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}


def _check_against(reference, module: nn.Module, x: torch.Tensor, ctx: object = None) -> None:
    """``module`` and ``reference(module, x)`` (autograd through composed ops) agree."""
    g = torch.randn_like(x)
    y, gx, gp = _grads(module, x, g, ctx)
    xr = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    yr = reference(module, xr)
    yr.backward(g)
    torch.testing.assert_close(y, yr.detach())
    torch.testing.assert_close(gx, xr.grad)
    for n, p in module.named_parameters():
        torch.testing.assert_close(gp[n], p.grad, msg=n)


# ----------------------------------------------------------------- the previous implementations

def _old_acn(m: AdaptiveContextNorm, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / (torch.exp(m.log_scale[ctx]) + m.eps)
    shift = -m.mean[ctx] * scale
    scale, shift = scale * m.weight[ctx], shift * m.weight[ctx] + m.bias[ctx]
    return torch.addcmul(shift[..., None, None], x, scale[..., None, None])


def _old_adain(m: ConditionalInstanceNorm, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    y = F.instance_norm(x, eps=m.eps)
    return torch.addcmul(m.bias[ctx][..., None, None], y, m.weight[ctx][..., None, None])


def _old_batchgroup(m: BatchGroupNorm, x: torch.Tensor) -> torch.Tensor:
    y = F.batch_norm(x.reshape(x.shape[0], m.num_groups, -1), None, None, None, None, True,
                     0.0, m.eps).reshape(x.shape)
    return y * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def _old_crossiter(m: CrossIterationBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The former forward (history as stored before the call), autograd through every op."""
    dims = [0, 2, 3]
    mu, nu = x.mean(dims), x.square().mean(dims)
    valid = m.hist_valid.to(x.dtype).unsqueeze(1)
    hm, hs = m.hist_mean, m.hist_sqmean
    count = 1 + valid.sum()
    mean = (mu + (valid * hm).sum(0)) / count
    sq = (torch.maximum(nu, mu.square()) + (valid * torch.maximum(hs, hm.square())).sum(0)) / count
    var = (sq - mean.square()).clamp_min(0)
    scale = torch.rsqrt(var + m.eps) * m.weight
    shift = m.bias - mean * scale
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


def _old_proxy(m: ProxyNorm, x: torch.Tensor) -> torch.Tensor:
    phi = NF.ACTIVATIONS[m.activation]
    y = F.group_norm(x, m.num_groups, None, None, m.eps)
    z = phi(torch.addcmul(m.bias.view(1, -1, 1, 1), y, m.weight.view(1, -1, 1, 1)))
    mean, var = NF.proxy_moments(phi, m.weight, m.bias, m.proxy_weight, m.proxy_bias,
                                 m.quantiles)
    inv = torch.rsqrt(var + m.proxy_eps)
    return torch.addcmul((-mean * inv).view(1, -1, 1, 1), z, inv.view(1, -1, 1, 1))


def _randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def test_acn_and_adain_match_the_previous_implementation() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 3, dtype=D) * 2 + 1
    ctx = torch.tensor([2, 0, 1, 1, 0, 2])
    acn = _randomize(AdaptiveContextNorm(5, num_contexts=3, affine=True, dtype=D))
    _check_against(lambda m, xr: _old_acn(m, xr, ctx), acn, x, ctx)
    adain = _randomize(ConditionalInstanceNorm(5, num_contexts=3, dtype=D))
    _check_against(lambda m, xr: _old_adain(m, xr, ctx), adain, x, ctx)
    # one context for the whole batch: a broadcast (1, C) affine, same gradients
    _check_against(lambda m, xr: _old_acn(m, xr, torch.ones(6, dtype=torch.long)), acn, x, 1)


def test_batchgroup_and_proxy_match_the_previous_implementation() -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 8, 3, 4, dtype=D) * 3 - 1
    bg = _randomize(BatchGroupNorm(8, num_groups=2, dtype=D))
    _check_against(_old_batchgroup, bg, x)
    for activation in sorted(NF.ACTIVATIONS):
        pn = _randomize(ProxyNorm(8, num_groups=4, activation=activation, dtype=D))
        _check_against(_old_proxy, pn, x)


@pytest.mark.parametrize("running_stats", ["batch", "window"])
def test_crossiter_matches_the_previous_implementation_with_history(running_stats: str) -> None:
    torch.manual_seed(2)
    m = _randomize(CrossIterationBatchNorm(4, window=4, running_stats=running_stats, dtype=D))
    for step in range(5):  # empty, partial, then full (rolled) history
        x = torch.randn(6, 4, 3, 3, dtype=D) * (1 + step) + step
        g = torch.randn_like(x)
        ref = copy.deepcopy(m)  # parameters and the history before this call
        y, gx, gp = _grads(m, x, g)
        xr = x.clone().requires_grad_()
        yr = _old_crossiter(ref, xr)
        yr.backward(g)
        torch.testing.assert_close(y, yr.detach())
        torch.testing.assert_close(gx, xr.grad)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(gp[n], p.grad, msg=n)
        torch.testing.assert_close(m.hist_mean[0], x.mean((0, 2, 3)))
        torch.testing.assert_close(m.hist_sqmean[0], x.square().mean((0, 2, 3)))
        assert int(m.hist_valid.sum()) == min(step + 1, 3)


# ----------------------------------------------------------------- gradcheck of each backward

def test_gradcheck_grouped_batch_norm_with_channel_groups() -> None:
    torch.manual_seed(3)
    x = torch.randn(5, 6, 4, dtype=D, requires_grad=True)
    w = torch.randn(3, 6, dtype=D, requires_grad=True)
    b = torch.randn(3, 6, dtype=D, requires_grad=True)
    ids = torch.tensor([0, 2, 2, 1, 0])
    assert torch.autograd.gradcheck(
        lambda x, w, b: NF._GroupedBatchNorm.apply(x, ids, 3, 2, w, b, 1e-5)[0], (x, w, b)
    )
    assert torch.autograd.gradcheck(  # no affine
        lambda x: NF._GroupedBatchNorm.apply(x, ids, 3, 3, None, None, 1e-5)[0], (x,)
    )


@pytest.mark.parametrize("rows", [5, 1])
def test_gradcheck_affine_twice(rows: int) -> None:
    torch.manual_seed(4)
    x = torch.randn(5, 3, 4, dtype=D, requires_grad=True)
    scale = torch.randn(rows, 3, dtype=D, requires_grad=True)
    shift = torch.randn(rows, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(NF._Affine.apply, (x, scale, shift))
    assert torch.autograd.gradgradcheck(NF._Affine.apply, (x, scale, shift))


def test_gradcheck_cross_iteration_with_history() -> None:
    torch.manual_seed(5)
    x = torch.randn(4, 3, 5, dtype=D, requires_grad=True)
    w = torch.randn(3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    hm = torch.randn(3, 3, dtype=D)
    hs = hm.square() + torch.rand(3, 3, dtype=D)
    valid = torch.tensor([True, True, False])
    assert torch.autograd.gradcheck(
        lambda x, w, b: NF._CrossIterationBatchNorm.apply(x, w, b, hm, hs, valid, 1e-5)[0],
        (x, w, b),
    )


@pytest.mark.parametrize("activation", sorted(NF.ACTIVATIONS))
def test_gradcheck_proxy_kernel(activation: str) -> None:
    torch.manual_seed(6)
    x = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    w = torch.randn(3, 4, dtype=D, requires_grad=True)
    b = torch.randn(3, 4, dtype=D, requires_grad=True)
    scale = torch.rand(4, dtype=D, requires_grad=True)
    shift = torch.randn(4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: NF._ProxyNorm.apply(t[0], 2, *t[1:], 1e-5, activation),
        (x, w, b, scale, shift),
    )


# ----------------------------------------------------------------- device and dtype

NAMES = [n for n in available() if n != "none"]


@pytest.mark.parametrize("name", NAMES)
def test_every_norm_takes_device_and_dtype(name: str) -> None:
    meta = make_norm(name, 8, num_contexts=2, device="meta")
    tensors = list(meta.parameters()) + list(meta.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    m = make_norm(name, 8, num_contexts=2, dtype=D)
    floats = [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == D for t in floats)
    x = torch.randn(4, 8, 3, 3, dtype=D, requires_grad=True)
    with use_context(m, torch.tensor([0, 1, 1, 0])):
        y = m(x)
    assert y.dtype == D
    y.sum().backward()
    assert x.grad.dtype == D


@pytest.mark.parametrize("name", ["context", "acn", "proxy", "crossiter"])
def test_convert_norms_builds_on_the_old_layers_dtype(name: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(D)
    converted = convert_norms(model, name, num_contexts=2)
    tensors = list(converted.parameters()) + list(converted.buffers())
    assert {t.dtype for t in tensors if t.is_floating_point()} == {D}
    with use_context(converted, torch.tensor([0, 1])):
        assert converted(torch.randn(2, 3, 5, 5, dtype=D)).dtype == D


def test_functional_reexports_the_uan_and_mixture_math() -> None:
    import fedctx.norm.mixture as mixture
    import fedctx.norm.uan as uan

    assert NF.uan_norm is uan.uan_norm and NF.mixture_norm is mixture.mixture_norm
    assert {"uan_norm", "mixture_norm"} <= set(NF.__all__)


# ----------------------------------------------------------------- which modules are norms


class _ThirdPartyNorm(nn.Module):
    """A norm defined outside fedctx: per-channel RMS scaling by gains a linear map computes
    from the channels' RMS (a norm that owns a linear layer), counting its calls."""

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gain = nn.Linear(num_features, num_features)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        rms = x.square().mean((0, 2, 3)).add(self.eps).rsqrt()
        return x * (rms * self.gain(rms)).view(1, -1, 1, 1)


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))
    monkeypatch.setattr(factory, "_NORM_CLASSES", set(factory._NORM_CLASSES))


def _model(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.Linear(4, 2))


def test_registered_third_party_class_is_norm_state_unregistered_is_not(
    clean_registry: None,
) -> None:
    plain = _model(_ThirdPartyNorm(4))  # before registration: an ordinary module
    assert not is_norm_module(plain[1])
    split = split_state(plain)
    assert {"1.gain.weight", "1.gain.bias", "1.calls"} <= set(split.shared) and not split.norm
    assert id(plain[1].gain.weight) in {id(p) for p in decayed_parameters(plain)}

    assert register_norm("third-party-rms")(_ThirdPartyNorm) is _ThirdPartyNorm
    model = _model(make_norm("third-party-rms", 4, eps=1e-5))
    assert isinstance(model[1], _ThirdPartyNorm) and model[1].eps == 1e-5
    assert is_norm_module(model[1]) and is_norm_module(plain[1])
    split = split_state(model)
    assert split.norm_affine == ("1.gain.weight", "1.gain.bias")
    assert split.norm_stats == ("1.calls",)
    assert not set(split.norm) & set(split.shared)
    assert {id(p) for p in decayed_parameters(model)} == {id(model[0].weight),
                                                          id(model[2].weight)}


def test_every_fedctx_layer_declares_itself_a_norm() -> None:
    for name in NAMES:
        layer = make_norm(name, 8, num_contexts=2)
        assert is_norm_module(layer), name
    assert not is_norm_module(factory.WSConv2d(3, 4, 3))
    assert not is_norm_module(nn.Identity())
