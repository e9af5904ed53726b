"""The fused mixture-normalization kernel (:mod:`fedctx.norm._mixkernel`): its closed-form
backward by float64 gradcheck, and its agreement with the tensor-operation path (autograd)."""

from __future__ import annotations

import math

import pytest
import torch

from fedctx.norm import _mixkernel as mk

needs_kernel = pytest.mark.skipif(
    not mk.kernel_available(torch.zeros(1, dtype=torch.float64), 3),
    reason="no C++ compiler: the kernel is not built")


def _inputs(shape=(5, 3, 13), k=3, dtype=torch.float64, given=False, seed=0):
    torch.manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, dtype=dtype) * 1.5 + 0.3
    q = torch.randn(k, c, dtype=dtype) * 0.3
    mu, r = torch.randn(k, c, dtype=dtype), torch.rand(k, c, dtype=dtype) + 0.5
    coef = torch.rand(k, c, dtype=dtype) + 0.5
    e, v = (torch.randn(k, c, dtype=dtype), torch.rand(k, c, dtype=dtype) + 0.2) if given else (
        None, None)
    weight, bias = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    return x, q, mu, r, coef, e, v, weight, bias


@needs_kernel
@pytest.mark.parametrize("log_eps", [math.log(1e-3), None], ids=["authors", "softmax"])
@pytest.mark.parametrize("given", [False, True], ids=["batch", "given"])
def test_gradcheck(log_eps: float | None, given: bool) -> None:
    """13 positions: three full 4-lane float64 blocks and a partial one; affine included."""
    inputs = [t if t is None else t.requires_grad_() for t in _inputs(given=given)]
    assert torch.autograd.gradcheck(
        lambda *a: mk._MixtureMomentsFunction.apply(*a, 1e-3, log_eps, True)[0], inputs)


@needs_kernel
@pytest.mark.parametrize("given", [False, True], ids=["batch", "given"])
@pytest.mark.parametrize("tau_grad", [True, False])
@pytest.mark.parametrize("shape", [(5, 3, 13), (64, 3, 700)], ids=["one-thread", "threads"])
def test_kernel_matches_tensor_operations(given: bool, tau_grad: bool, shape) -> None:
    """Outputs, moments and gradients; ``tau_grad=False`` (tau constant) and ``coef=None``
    (Mixture Normalization's mean posterior) included; large enough to split channels across
    threads in the second case."""
    x, q, mu, r, coef, e, v, weight, bias = _inputs(shape, given=given)
    for cf in (coef, None) if not given else (coef,):
        leaves = [t.clone().requires_grad_() for t in (x, q, mu, r)]
        extra = [t if t is None else t.clone().requires_grad_() for t in (cf, e, v, weight, bias)]
        args = (*leaves, *extra, 1e-3, math.log(1e-3), tau_grad)
        got = mk._MixtureMomentsFunction.apply(*args)
        want = mk._tensor_ops(*args)
        for a, b in zip(got[:3], want[:3], strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        if not given:
            torch.testing.assert_close(got[3], want[3])
        inputs = [t for t in (*leaves, *extra) if t is not None]
        g = torch.randn_like(x)
        grads_got = torch.autograd.grad(got[0], inputs, g, allow_unused=True)
        grads_want = torch.autograd.grad(want[0], inputs, g, allow_unused=True)
        for a, b in zip(grads_got, grads_want, strict=True):
            if b is None:  # tau constant: no gradient into q, mu, r on either path
                assert a is None or not a.abs().max() > 0
            else:
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@needs_kernel
def test_float32_kernel_close_to_float64() -> None:
    """The float32 kernel's own exp (a polynomial) against float64."""
    args = _inputs((16, 4, 100), k=4, dtype=torch.float32)
    y32 = mk.mixture_moments_norm(*args, eps=1e-3, log_eps=math.log(1e-3))[0]
    y64 = mk._tensor_ops(*(t if t is None else t.double() for t in args), 1e-3, math.log(1e-3),
                         True)
    torch.testing.assert_close(y32.double(), y64[0], atol=2e-5, rtol=1e-5)


@needs_kernel
def test_far_activations_get_no_component_and_stay_finite() -> None:
    x, q, mu, r, coef, _, _, _, _ = _inputs(dtype=torch.float32)
    x[0, 0, :4] = torch.tensor([50.0, -80.0, 1e4, -1e4])
    x.requires_grad_()
    y = mk.mixture_moments_norm(x, q, mu, r, coef, eps=1e-3, log_eps=math.log(1e-3))[0]
    assert torch.isfinite(y).all() and y[0, 0, :4].abs().max() < 1e-6
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_without_a_compiler_layers_warn_and_use_tensor_operations(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from fedctx.norm import make_norm

    x = torch.randn(4, 3, 5, 5)

    def run(name: str) -> torch.Tensor:
        torch.manual_seed(0)
        return make_norm(name, 3)(x)

    expected = {name: run(name) for name in ("uan", "mixture")}
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FEDCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(mk, "_libs", {})
    with pytest.warns(RuntimeWarning, match="kernel not built"):
        assert not mk.kernel_available(x, 3)
        for name, want in expected.items():
            torch.testing.assert_close(run(name), want, atol=1e-5, rtol=1e-5)


_LAYERS = {"uan": ("uan", {"num_components": 3}),
           "uan-learned": ("uan", {"num_components": 3, "moments": "learned"}),
           "mixture": ("mixture", {"num_components": 2})}


def _compiled_and_eager(case: str, training: bool, backend) -> tuple[list, list]:
    """Output, input gradient, parameter gradients and buffers of one forward+backward of a
    layer (``_LAYERS[case]``), ``torch.compile``d with ``backend`` and eager (the same initial
    state)."""
    from fedctx.norm import make_norm

    name, options = _LAYERS[case]

    torch.manual_seed(0)
    x, g = torch.randn(6, 4, 5, 7) * 1.5 + 0.3, torch.randn(6, 4, 5, 7)
    results = []
    for compiled in (True, False):
        torch.manual_seed(1)
        layer = make_norm(name, 4, **options).train(training)
        if not training:  # running moments away from their initial values
            layer.train()(x * 0.8 - 0.1)
            layer.eval()
        xi = x.clone().requires_grad_()
        fn = torch.compile(layer, backend=backend, fullgraph=True) if compiled else layer
        y = fn(xi)
        y.backward(g)
        results.append([y, xi.grad, *(p.grad for p in layer.parameters()), *layer.buffers()])
    return results[0], results[1]


def _assert_all_close(got: list, want: list) -> None:
    assert len(got) == len(want) and len(got) > 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["uan", "mixture"])
def test_compiled_graph_calls_the_kernel(name: str, training: bool) -> None:
    """Under ``torch.compile`` the forward graph calls the kernel's passes as opaque custom ops
    and the backward graph its closed-form backward (not autograd over ``(N, K, C, S)`` tensor
    operations); the graphs, run as traced, match eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[set[str]] = []
    largest = []  # elements of each tensor the graphs make

    def record(gm: torch.fx.GraphModule, _inputs):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        graphs.append({str(n.target) for n in nodes})
        largest.extend(n.meta["val"].numel() for n in nodes
                       if isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    got, want = _compiled_and_eager(name, training, aot_autograd(fw_compiler=record,
                                                                 bw_compiler=record))
    _assert_all_close(got, want)
    forward, backward = graphs
    assert "fedctx.mixkernel_mix.default" in forward
    assert ("fedctx.mixkernel_stats.default" in forward) == training
    assert "fedctx.mixkernel_backward.default" in backward
    assert ("fedctx.mixkernel_backward_sums.default" in backward) == training
    assert max(largest) == got[0].numel()  # no (N, K, C, S) tensor


@needs_kernel
@pytest.mark.parametrize("case", sorted(_LAYERS))
def test_inductor_compiled_layer_matches_eager(case: str) -> None:
    """The default ``torch.compile`` backend (inductor) around the custom ops: outputs,
    gradients (input, every parameter) and running moments as eager, in float32 (learned UAN
    passes its means twice, as ``mu`` and ``E``)."""
    got, want = _compiled_and_eager(case, True, "inductor")
    _assert_all_close(got, want)


def test_importing_the_norms_leaves_torch_dynamo_unimported() -> None:
    """``import torch._dynamo`` costs 1.5 s of start-up in the driver and every client worker;
    the kernel marks its readiness check constant for torch.compile without it."""
    import subprocess
    import sys

    code = ("import sys, fedctx.norm, fedctx.models; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readiness_check_carries_what_assume_constant_result_sets() -> None:
    def probe() -> bool:
        return True

    before = set(vars(probe))
    marked = torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(marked).items() if k not in before}
    assert added and all(getattr(mk._kernel_ready, k, None) == v for k, v in added.items())
