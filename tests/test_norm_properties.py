"""Every layer: float32, bfloat16 autocast, eval with batch size 1, torch.compile (CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from fedctx.norm import available, make_norm, use_context

NAMES = [n for n in available() if n != "none"]
CONTEXT_AWARE = {"context", "acn", "scb", "adain"}


def _ctx(name: str, n: int) -> torch.Tensor | None:
    return torch.arange(n) % 3 if name in CONTEXT_AWARE else None


def _forward(m: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
    with use_context(m, ctx):
        return m(x)


@pytest.mark.parametrize("name", NAMES)
def test_float32_train_and_eval_batch_of_one(name: str) -> None:
    torch.manual_seed(0)
    m = make_norm(name, 8, dims=2, num_contexts=3)
    x = torch.randn(6, 8, 5, 5, requires_grad=True)
    y = _forward(m, x, _ctx(name, 6))
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        y1 = _forward(m, x[:1], _ctx(name, 1))
        yb = _forward(m, x, _ctx(name, 6))
    assert y1.shape == (1, 8, 5, 5) and torch.isfinite(y1).all()
    torch.testing.assert_close(y1, yb[:1], atol=1e-5, rtol=1e-5)  # eval is per sample


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast(name: str) -> None:
    torch.manual_seed(0)
    m = make_norm(name, 8, dims=2, num_contexts=3)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(6, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = _forward(m, h, _ctx(name, 6))
        y_ref = _forward(m, h.float(), _ctx(name, 6)) if name not in ("crossiter",) else y
    assert torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.isfinite(conv.weight.grad).all()
    if name not in ("crossiter", "mixture"):  # stateful across calls
        torch.testing.assert_close(y.float(), y_ref.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_dims_zero_and_one(name: str) -> None:
    if name in ("instance", "adain"):
        pytest.skip("needs spatial dims")
    for dims, shape in ((0, (6, 8)), (1, (6, 8, 7))):
        options = {"num_groups": 2} if name in ("group", "weightstd", "proxy") else {}
        m = make_norm(name, 8, dims=dims, num_contexts=3, **options)
        x = torch.randn(shape, requires_grad=True)
        _forward(m, x, _ctx(name, 6)).sum().backward()
        assert torch.isfinite(x.grad).all()


def _compile_check(name: str, backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = make_norm(name, 8, dims=2, num_contexts=3)
    ctx = torch.tensor([0, 2, 1, 0, 2, 2])
    x = torch.randn(6, 8, 4, 4)
    compiled = torch.compile(m, backend=backend, fullgraph=name != "context")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_context(m, ctx):
        y_ref = m(xa)
        y = compiled(xb)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["context", "acn", "uan"])
def test_torch_compile_traces(name: str) -> None:
    """Dynamo + AOTAutograd tracing (the graph inductor gets), quick on CPU."""
    _compile_check(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDCTX_SLOW"), reason="set FEDCTX_SLOW=1 (inductor build)")
@pytest.mark.parametrize("name", ["context", "acn", "uan"])
def test_torch_compile_inductor(name: str) -> None:
    """Full inductor compile (C++ codegen): ~40 s per layer cold on 2 CPU cores."""
    _compile_check(name, "inductor")
