"""Mixture Normalization: the fused kernel path against the layer's previous implementation
(tensor operations over ``(N, K, C, S)`` with autograd), its functional form and constructor."""

from __future__ import annotations

import math

import pytest
import torch

from fedctx.norm import MixtureNorm, fit_gmm
from fedctx.norm.mixture import mixture_norm


def _previous_forward(m: MixtureNorm, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``MixtureNorm.forward`` before the fused kernel (commit 7ce6e03), without its buffer
    updates: posteriors of the fitted (training) or running (evaluation) GMM over the whole
    ``(N, K, C, S)`` tensor, autograd through the moments (posteriors constant in training).
    Returns the output and the ``E, V, lambda`` it used."""
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    xs = xf.unsqueeze(1)

    def posteriors(prior, mean, var):
        var = var.clamp_min(1e-6).unsqueeze(-1)
        logp = (torch.log(prior.clamp_min(1e-12)).unsqueeze(-1) - 0.5 * torch.log(2 * math.pi * var)
                - (xs - mean.unsqueeze(-1)).square() / (2 * var))
        return torch.softmax(logp, dim=1)

    if m.training:
        prior, mu, var = fit_gmm(xf, m.num_components, m.em_iters, m.em_max_samples)
        with torch.no_grad():
            tau = posteriors(prior, mu, var)
            mass = tau.sum((0, 3))
            lam = mass / (n * xf.shape[-1])
        w = tau / mass.clamp_min(1e-12).unsqueeze(-1)
        e = (w * xs).sum((0, 3))
        v = (w * (xs - e.unsqueeze(-1)).square()).sum((0, 3))
    else:
        e, v, lam = m.running_mean, m.running_var, m.running_prior
        tau = posteriors(lam, e, v)
    coef = tau * torch.rsqrt(lam.clamp_min(1e-12)).unsqueeze(-1)
    out = (coef * (xs - e.unsqueeze(-1)) * torch.rsqrt(v + m.eps).unsqueeze(-1)).sum(1)
    y = (out * m.weight.view(1, -1, 1) + m.bias.view(1, -1, 1)).reshape(x.shape)
    return y, e.detach(), v.detach(), lam


def _module(k: int = 2, seed: int = 0) -> MixtureNorm:
    torch.manual_seed(seed)
    m = MixtureNorm(4, num_components=k, dtype=torch.float64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.bias.uniform_(-1, 1)
    return m


def _bimodal(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64)
    return x + torch.where(torch.rand(shape, dtype=torch.float64) < 0.4, -3.0, 2.0)


@pytest.mark.parametrize("k,shape", [(2, (8, 4, 5, 5)), (3, (16, 4, 9)), (2, (40, 4))])
def test_matches_previous_implementation_float64(k: int, shape: tuple[int, ...]) -> None:
    """Output, every gradient and the running estimates, in training then in evaluation."""
    m = _module(k)
    x = _bimodal(shape).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    params = [x, m.weight, m.bias]
    for train in (True, False):
        m.train(train)
        want, e, v, lam = _previous_forward(m, x)
        before = [b.clone() for b in (m.running_mean, m.running_var, m.running_prior)]
        got = m(x)
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9)
        for a, b in zip(torch.autograd.grad(got, params, g),
                        torch.autograd.grad(want, params, g), strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
        after = (m.running_mean, m.running_var, m.running_prior)
        for old, batch, new in zip(before, (e, v, lam), after, strict=True):
            torch.testing.assert_close(new, (0.9 * old + 0.1 * batch) if train else old)
    assert int(m.num_batches_tracked) == 1


def test_float32_close_to_previous_implementation() -> None:
    torch.manual_seed(1)
    m = MixtureNorm(6, num_components=3)
    x = _bimodal((32, 6, 7, 7)).float().requires_grad_()
    y = m(x)
    y.square().sum().backward()
    ref = _previous_forward(m, x.detach().requires_grad_())[0]
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)


def test_functional_form_and_constructor() -> None:
    m = _module()
    x = _bimodal((8, 4, 3, 3))
    rm, rv, rp = (b.clone() for b in (m.running_mean, m.running_var, m.running_prior))
    y = mixture_norm(x, rm, rv, rp, m.weight, m.bias, True, m.momentum, m.eps)
    torch.testing.assert_close(y, m(x))
    for mine, theirs in ((rm, m.running_mean), (rv, m.running_var), (rp, m.running_prior)):
        torch.testing.assert_close(mine, theirs)
    # no running estimates: batch statistics (as F.batch_norm), in evaluation too
    torch.testing.assert_close(mixture_norm(x, weight=m.weight, bias=m.bias), y)
    assert MixtureNorm.is_normalization
    assert {b.dtype for b in m.buffers()} == {torch.float64, torch.long}
    assert {p.dtype for p in m.parameters()} == {torch.float64}
