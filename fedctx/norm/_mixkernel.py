"""Gaussian-mixture normalization kernel shared by :mod:`fedctx.norm.uan` and
:mod:`fedctx.norm.mixture`, with a closed-form backward.

Both layers compute, for ``x`` ``(N, C, S)`` and ``K`` components per channel::

    l_k   = q_k - ((x - mu_k) r_k)^2 / 2                     (log-responsibility, unnormalised)
    tau_k = exp(l_k) / (sum_j exp(l_j) + eps_tau)             (eps_tau = exp(log_eps), or 0)
    y     = sum_k tau_k a_k (x - E_k),   a_k = coef_k / sqrt(V_k + eps)

with ``q, mu, r, coef`` ``(K, C)`` given, and ``E, V`` either given (evaluation, learned
moments) or the ``tau``-weighted batch moments over ``(N, S)`` (Kalayeh & Shah, Mixture
Normalization, TPAMI 2019; Faye et al., UAN, IJCNN 2024)::

    M_k = sum tau_k,   E_k = sum tau_k x / M_k,   V_k = sum tau_k (x - E_k)^2 / M_k

:func:`mixture_moments_norm` is that map as an autograd function. Its backward is closed form
(``g = dL/dy``, ``d_k = x - E_k``, ``m_k = x - mu_k``)::

    A0_k = sum g tau_k,  A1_k = sum g tau_k d_k
    dL/dE_k = -a_k A0_k,   dL/dV_k = -a_k A1_k / (2 (V_k + eps)),
    dL/dcoef_k = A1_k / sqrt(V_k + eps)
    batch moments: u_k = dL/dE_k / M_k, w_k = dL/dV_k / M_k (dE_k/dtau_k = d_k / M_k,
        dV_k/dtau_k = (d_k^2 - V_k) / M_k); given moments: u = w = 0
    G_k  = g a_k d_k + u_k d_k + w_k (d_k^2 - V_k)                     (dL/dtau_k)
    dl_k = tau_k (G_k - sum_j tau_j G_j)                               (dL/dl_k, both tau forms)
    dx   = sum_k tau_k (g a_k + u_k + 2 w_k d_k) - sum_k dl_k m_k r_k^2
    dq_k = sum dl_k,  dmu_k = r_k^2 sum dl_k m_k,  dr_k = -r_k sum dl_k m_k^2

(``tau_grad=False``: ``tau`` is a constant, ``dl = 0``, as Mixture Normalization's training
branch has it). Sums run over ``(N, S)``.

On CPU (float32, float64; ``K <= 8``) each pass is one read of ``x`` in a C++ kernel
(``_mixkernel.cpp``, explicit SIMD; built with the system C++ compiler once per machine, element
type and ``K`` into the user cache, a few seconds, and loaded with ctypes; ``tau`` is recomputed
in registers, never stored as an ``(N, K, C, S)`` tensor): two passes forward (moments, output)
and two backward (``A0, A1``, then the rest) with batch moments, one each way with given
moments; the affine ``weight, bias`` are folded into the passes, and samples with fewer than 32
positions are regrouped into one row per channel. The passes are custom ops
(``fedctx::mixkernel_stats``, ``_mix``, ``_backward_sums``, ``_backward``, opaque to
``torch.compile``, whose graphs call them as eager does: Dynamo traces the autograd function,
the ``(K, C)`` arithmetic between passes included). Elsewhere (CUDA, other dtypes, no compiler)
the same map runs as tensor operations over ``(N, K, C, S)`` and autograd differentiates it;
the tests check both paths against each other, gradcheck the kernel in float64 and compare
compiled layers with eager.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from fedctx.norm._common import apply_affine

_SOURCE = Path(__file__).with_name("_mixkernel.cpp")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC"]
_MAX_COMPONENTS = 8
_PARALLEL_ELEMENTS = 1 << 15  # below this, one thread (the pool's hand-off costs more)
_SHORT_ROW = 32  # rows (spatial positions) shorter than this are regrouped per channel
_lock = threading.Lock()
_libs: dict[tuple[torch.dtype, int], ctypes.CDLL | None] = {}  # None: cannot be built
_pool: tuple[tuple[int, int], ThreadPoolExecutor] | None = None
P = ParamSpec("P")
R = TypeVar("R")


def _cache_dir() -> Path:
    root = os.environ.get("FEDCTX_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "fedctx" if root else Path.home() / ".cache" / "fedctx"


def _warn_unbuilt(err: Exception) -> None:
    warnings.warn(f"fedctx: mixture-norm CPU kernel not built ({err}); uan and mixture use the "
                  "slower tensor-operation path", RuntimeWarning, stacklevel=5)


def _build(dtype: torch.dtype, num_components: int) -> ctypes.CDLL | None:
    """Compile (once per source, flags, element type, ``K`` and machine) and load the kernel;
    ``None`` when impossible."""
    try:
        source = _SOURCE.read_bytes()
    except OSError as err:
        _warn_unbuilt(err)
        return None
    c_type, elem = ((ctypes.c_float, "float") if dtype == torch.float32
                    else (ctypes.c_double, "double"))
    flags = [*_FLAGS, f"-DFEDCTX_T={elem}", f"-DFEDCTX_K={num_components}"]
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), platform.machine().encode(),
                    platform.node().encode(), sys.platform.encode()])
    ).hexdigest()[:16]
    path = _cache_dir() / f"mixkernel-{elem}-k{num_components}-{key}.so"
    if not path.exists():
        compiler = os.environ.get("CXX", "c++")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], check=True,
                           capture_output=True, timeout=300)
            os.replace(tmp, path)  # atomic: concurrent processes never load a partial file
        except (OSError, subprocess.SubprocessError) as err:
            _warn_unbuilt(err)
            return None
    lib = ctypes.CDLL(str(path))
    p, i64, i32, t = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, c_type
    lib.mixkernel_stats.argtypes = [p, i64, i64, i64, p, p, p, t, i32, i64, i64, p]
    lib.mixkernel_mix.argtypes = [p, i64, i64, i64, p, p, p, t, i32, p, p, p, i64, i64, p]
    lib.mixkernel_backward.argtypes = [i32, p, p, i64, i64, i64, p, p, p, t, i32, p, p, p, p, p,
                                       i32, i64, i64, p, p, p]
    for fn in (lib.mixkernel_stats, lib.mixkernel_mix, lib.mixkernel_backward):
        fn.restype = None
    return lib


def _library(dtype: torch.dtype, num_components: int) -> ctypes.CDLL | None:
    key = (dtype, num_components)
    if key not in _libs:
        with _lock:
            if key not in _libs:
                _libs[key] = _build(dtype, num_components)
    return _libs[key]


def _kernel_ready(device_type: str, dtype: torch.dtype, num_components: int) -> bool:
    """Whether the kernel handles this device, dtype and ``K`` (built on first ask)."""
    return (device_type == "cpu" and dtype in (torch.float32, torch.float64)
            and num_components <= _MAX_COMPONENTS
            and _library(dtype, num_components) is not None)


# torch.compile decides this once while tracing. What ``torch.compiler.assume_constant_result``
# does, without its ``import torch._dynamo`` (1.5 s, in every process that imports fedctx.norm);
# tests/test_norm_mixkernel.py checks that the decorator still sets exactly this.
_kernel_ready._dynamo_marked_constant = True  # type: ignore[attr-defined]


def kernel_available(x: torch.Tensor, num_components: int) -> bool:
    """Whether the fused CPU kernel handles ``x`` (CPU float32/float64, ``K <= 8``)."""
    return _kernel_ready(x.device.type, x.dtype, num_components)


def _run(name: str, x: torch.Tensor, k: int, make_args) -> None:
    """Call ``name`` over channel ranges, on ``torch.get_num_threads()`` threads when ``x`` is
    large (a few ranges per thread, so that a thread slowed by other load does not hold the
    rest up)."""
    global _pool
    fn = getattr(_library(x.dtype, k), f"mixkernel_{name}")
    c = x.shape[1]
    threads = torch.get_num_threads()
    parts = 1 if x.numel() < _PARALLEL_ELEMENTS or threads == 1 else min(c, 4 * threads)
    bounds = [c * i // parts for i in range(parts + 1)]
    calls = [make_args(c0, c1) for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True)]
    if parts == 1:
        fn(*calls[0])
    else:
        with _lock:  # a new pool for a new thread count, or in a forked child (no threads)
            if _pool is None or _pool[0] != (threads, os.getpid()):
                _pool = ((threads, os.getpid()),
                         ThreadPoolExecutor(threads, thread_name_prefix="fedctx-mixkernel"))
        list(_pool[1].map(lambda args: fn(*args), calls))


def _opaque(fake: Callable[..., object]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a kernel pass as the custom op ``fedctx::mixkernel<name>`` with ``fake`` for
    its output shapes: ``torch.compile`` graphs call the op (opaque, the kernel runs) instead of
    tracing into ctypes; eager calls skip the dispatcher (about 15 us a call)."""

    def register(impl: Callable[P, R]) -> Callable[P, R]:
        op = torch.library.custom_op(f"fedctx::mixkernel{impl.__name__}", impl, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(impl)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return (op if torch.compiler.is_compiling() else impl)(*args, **kwargs)

        return call

    return register


def _sums_like(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return x.new_zeros(shape, dtype=torch.float64)


def _flags(log_eps: float | None) -> tuple[float, int]:
    return (0.0, 0) if log_eps is None else (log_eps, 1)


@_opaque(lambda x, q, mu, r, log_eps: _sums_like(x, 3, q.shape[0], x.shape[1]))
def _stats(x: torch.Tensor, q: torch.Tensor, mu: torch.Tensor, r: torch.Tensor,
           log_eps: float | None) -> torch.Tensor:
    """``(3, K, C)`` float64: sums of ``tau_k``, ``tau_k (x - mu_k)``, ``tau_k (x - mu_k)^2``
    over ``(N, S)`` of ``x`` ``(N, C, S)``."""
    x, q, mu, r = (t.contiguous() for t in (x, q, mu, r))
    k = q.shape[0]
    out = _sums_like(x, 3, k, x.shape[1])
    n, c, s = x.shape
    le, use = _flags(log_eps)
    _run("stats", x, k, lambda c0, c1: (_ptr(x), n, c, s, _ptr(q), _ptr(mu), _ptr(r), le, use,
                                     c0, c1, _ptr(out)))
    return out


@_opaque(lambda x, q, mu, r, log_eps, a, e, b: torch.empty_like(
    x, memory_format=torch.contiguous_format))
def _mix(x: torch.Tensor, q: torch.Tensor, mu: torch.Tensor, r: torch.Tensor,
         log_eps: float | None, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor
         ) -> torch.Tensor:
    """``y = sum_k tau_k a_k (x - e_k) + b`` ``(N, C, S)``."""
    x, q, mu, r, a, e, b = (t.contiguous() for t in (x, q, mu, r, a, e, b))
    k = q.shape[0]
    y = torch.empty_like(x)
    n, c, s = x.shape
    le, use = _flags(log_eps)
    _run("mix", x, k, lambda c0, c1: (_ptr(x), n, c, s, _ptr(q), _ptr(mu), _ptr(r), le, use,
                                   _ptr(a), _ptr(e), _ptr(b), c0, c1, _ptr(y)))
    return y


def _backward_pass(x, g, q, mu, r, log_eps, a, e, v, u, w, tau_grad: bool, reduce_only: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One backward pass (``mixkernel_backward``): ``(gx or None, sums, gsum)``."""
    x, g, q, mu, r, a, e, v, u, w = (t.contiguous() for t in (x, g, q, mu, r, a, e, v, u, w))
    k = q.shape[0]
    n, c, s = x.shape
    out = _sums_like(x, 2 if reduce_only else 5, k, c)
    gsum = _sums_like(x, c)
    gx = None if reduce_only else torch.empty_like(x)
    le, use = _flags(log_eps)
    _run("backward", x, k, lambda c0, c1: (
        int(reduce_only), _ptr(x), _ptr(g), n, c, s, _ptr(q), _ptr(mu), _ptr(r), le, use,
        _ptr(a), _ptr(e), _ptr(v), _ptr(u), _ptr(w), int(tau_grad), c0, c1,
        None if gx is None else _ptr(gx), _ptr(out), _ptr(gsum)))
    return gx, out, gsum


@_opaque(lambda x, g, q, mu, r, log_eps, a, e, v: _sums_like(x, 2, q.shape[0], x.shape[1]))
def _backward_sums(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, mu: torch.Tensor,
                   r: torch.Tensor, log_eps: float | None, a: torch.Tensor, e: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
    """``(2, K, C)`` float64: ``A0 = sum g tau_k``, ``A1 = sum g tau_k (x - e_k)``."""
    zeros = torch.zeros_like(a)
    return _backward_pass(x, g, q, mu, r, log_eps, a, e, v, zeros, zeros, False, True)[1]


@_opaque(lambda x, g, q, mu, r, log_eps, a, e, v, u, w, tau_grad: (
    torch.empty_like(x, memory_format=torch.contiguous_format),
    _sums_like(x, 5, q.shape[0], x.shape[1]), _sums_like(x, x.shape[1])))
def _backward(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, mu: torch.Tensor,
              r: torch.Tensor, log_eps: float | None, a: torch.Tensor, e: torch.Tensor,
              v: torch.Tensor, u: torch.Tensor, w: torch.Tensor, tau_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dx (N, C, S), sums (5, K, C), sum g (C,))``: the sums are ``A0, A1`` and
    ``sum dl_k``, ``sum dl_k m_k``, ``sum dl_k m_k^2`` (zero unless ``tau_grad``), float64."""
    return _backward_pass(x, g, q, mu, r, log_eps, a, e, v, u, w, tau_grad, False)  # type: ignore[return-value]


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _contig(*ts: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.detach().to(dtype).contiguous() for t in ts]


def _moments(sums: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(M, E, V)`` from the kernel's ``(3, K, C)`` float64 sums (shifted by ``mu``)."""
    mass = sums[0].clamp_min(torch.finfo(torch.float64).tiny)
    shift = sums[1] / mass
    return mass, mu.double() + shift, (sums[2] / mass - shift.square()).clamp_min(0)


class _MixtureMomentsFunction(torch.autograd.Function):
    """The fused CPU kernel with the closed-form backward of the module docstring; the affine
    ``weight, bias`` ``(C,)`` are folded in (``a_k <- weight a_k``, ``+ bias`` in the output
    pass, ``dL/dbias = sum g``, ``dL/dweight = sum_k a_k A1_k / weight``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor, q: torch.Tensor, mu: torch.Tensor, r: torch.Tensor,
        coef: torch.Tensor | None, e: torch.Tensor | None, v: torch.Tensor | None,
        weight: torch.Tensor | None, bias: torch.Tensor | None,
        eps: float, log_eps: float | None, tau_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = x.dtype
        q, mu, r = _contig(q, mu, r, dtype=dt)
        batch = e is None
        if batch:
            mass, e64, v64 = _moments(_stats(x, q, mu, r, log_eps), mu)
            e, v = e64.to(dt), v64.to(dt)
        else:
            mass = torch.zeros_like(e, dtype=torch.float64)
            e, v = _contig(e, v, dtype=dt)
        coef = (torch.rsqrt(mass / (x.shape[0] * x.shape[2])).clamp_max(1e6).to(dt)
                if coef is None else coef.detach().to(dt))
        scale = torch.rsqrt(v + eps)
        a = coef * scale  # before the affine weight
        w = torch.ones(x.shape[1], dtype=dt) if weight is None else weight.detach().to(dt)
        b = torch.zeros(x.shape[1], dtype=dt) if bias is None else bias.detach().to(dt)
        aw = a * w
        y = _mix(x, q, mu, r, log_eps, aw, e, b)
        mass = mass.to(dt)
        ctx.save_for_backward(x, q, mu, r, a, aw, w, e, v, scale, mass)
        ctx.eps, ctx.log_eps, ctx.tau_grad, ctx.batch = eps, log_eps, tau_grad, batch
        ctx.mark_non_differentiable(e, v, mass)
        return y, e, v, mass

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, q, mu, r, a, aw, w, e, v, scale, mass = ctx.saved_tensors
        args = (x, grad, q, mu, r, ctx.log_eps, aw, e, v)
        if ctx.batch:
            sums = _backward_sums(*args).to(x.dtype)
            u = -aw * sums[0] / mass  # dL/dE / M
            w_v = -0.5 * aw * sums[1] / ((v + ctx.eps) * mass)  # dL/dV / M
        else:
            u = w_v = torch.zeros_like(a)
        gx, sums, gsum = _backward(*args, u, w_v, ctx.tau_grad)
        a0, a1, t0, t1, t2 = sums.to(x.dtype)
        need, tg, given = ctx.needs_input_grad, ctx.tau_grad, not ctx.batch
        return (
            gx,
            t0 if tg and need[1] else None,
            r.square() * t1 if tg and need[2] else None,
            -r * t2 if tg and need[3] else None,
            a1 * scale * w if need[4] else None,
            -aw * a0 if given and need[5] else None,
            -0.5 * aw * a1 / (v + ctx.eps) if given and need[6] else None,
            (a * a1).sum(0) if need[7] else None,
            gsum.to(x.dtype) if need[8] else None,
            None, None, None,
        )


def responsibilities(logits: torch.Tensor, dim: int, log_eps: float | None) -> torch.Tensor:
    """``tau`` from ``logits = log g`` along ``dim``.

    ``log_eps=None``: ``softmax`` (``g_k / sum_j g_j``). Otherwise the authors'
    ``g_k / (sum_j g_j + eps)`` with ``eps = exp(log_eps)``, as
    ``exp(l_k - logaddexp(logsumexp(l), log_eps))`` (no overflow, finite gradients). Both have
    the Jacobian ``d tau_k / d l_j = tau_k (delta_kj - tau_j)``.
    """
    if log_eps is None:
        return torch.softmax(logits, dim=dim)
    lse = torch.logsumexp(logits, dim=dim, keepdim=True)
    return torch.exp(logits - torch.logaddexp(lse, torch.full_like(lse, log_eps)))


def _tau(x: torch.Tensor, q, mu, r, log_eps) -> torch.Tensor:
    """``tau`` ``(N, K, C, S)`` as tensor operations."""
    z = (x.unsqueeze(1) - mu.unsqueeze(-1)) * r.unsqueeze(-1)
    return responsibilities(q.unsqueeze(-1) - 0.5 * z.square(), 1, log_eps)


def _weighted_moments(x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(M, E, V)`` ``(K, C)`` of ``x`` ``(N, C, S)`` weighted by ``tau`` over ``(N, S)``."""
    xs = x.unsqueeze(1)
    mass = tau.sum((0, 3))
    w = tau / mass.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
    e = (w * xs).sum((0, 3))
    return mass, e, (w * (xs - e.unsqueeze(-1)).square()).sum((0, 3))


def _tensor_ops(x, q, mu, r, coef, e, v, weight, bias, eps, log_eps, tau_grad):
    """The same map as tensor operations over ``(N, K, C, S)``, differentiated by autograd."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and tau_grad):
        tau = _tau(x, q, mu, r, log_eps)
    if e is None:
        mass, e, v = _weighted_moments(x, tau)
    else:
        mass = tau.sum((0, 3))
    if coef is None:
        coef = torch.rsqrt(mass.detach() / (x.shape[0] * x.shape[2])).clamp_max(1e6)
    a = coef * torch.rsqrt(v + eps)
    y = (tau * a.unsqueeze(-1) * (x.unsqueeze(1) - e.unsqueeze(-1))).sum(1)
    return apply_affine(y, weight, bias), e.detach(), v.detach(), mass.detach()


def _distinct(tensors: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """``tensors`` with each repeat (e.g. ``mu`` given again as ``E``) replaced by a view:
    Dynamo traces ``autograd.Function.apply`` only over distinct tensors (gradients into the
    views accumulate into the tensor as before)."""
    out: list[torch.Tensor | None] = []
    for t in tensors:
        out.append(t.view_as(t) if t is not None and any(t is u for u in out) else t)
    return out


@torch.no_grad()
def mixture_moments(
    x: torch.Tensor, q: torch.Tensor, mu: torch.Tensor, r: torch.Tensor,
    log_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, E, V)`` ``(K, C)``: summed ``tau`` and the ``tau``-weighted mean and variance of
    ``x`` ``(N, C, S)`` over ``(N, S)``, without gradient (one EM step's statistics); one kernel
    pass on CPU."""
    if not kernel_available(x, q.shape[0]):
        return _weighted_moments(x, _tau(x, q, mu, r, log_eps))
    q, mu, r = _contig(q, mu, r, dtype=x.dtype)
    sums = _stats(x, q, mu, r, log_eps)
    return tuple(t.to(x.dtype) for t in _moments(sums, mu))  # type: ignore[return-value]


def mixture_moments_norm(
    x: torch.Tensor,
    q: torch.Tensor,
    mu: torch.Tensor,
    r: torch.Tensor,
    coef: torch.Tensor | None,
    e: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    log_eps: float | None = None,
    tau_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = weight * sum_k tau_k coef_k (x - E_k) / sqrt(V_k + eps) + bias`` (see the module
    docstring).

    Args:
        x: ``(N, C, S)``, float32 or float64.
        q, mu, r: ``(K, C)``: ``tau``'s logits ``l_k = q_k - ((x - mu_k) r_k)^2 / 2``.
        coef: ``(K, C)`` per-component factor, or ``None`` for ``M_k^-1/2`` with ``M_k`` the
            mean ``tau_k`` over the batch (Mixture Normalization's ``lambda_k``), a constant.
        e, v: ``(K, C)`` moments, or ``None`` for the ``tau``-weighted batch moments.
        weight, bias: ``(C,)`` affine after the normalization, or ``None``.
        eps: added to ``V`` under the square root.
        log_eps: ``log`` of the ``eps`` in ``tau``'s denominator (UAN's authors' form), or
            ``None`` for the softmax.
        tau_grad: whether gradients flow through ``tau`` (``False``: ``tau`` is a constant).

    Returns:
        ``(y, E, V, M)``: ``(N, C, S)``, and the moments used and the summed ``tau`` per
        component ``(K, C)``, without gradient (``M`` is zero when ``e`` and ``v`` are given on
        the kernel path).
    """
    args = (q, mu, r, coef, e, v, weight, bias, eps, log_eps, tau_grad)
    if not kernel_available(x, q.shape[0]):
        return _tensor_ops(x, *args)
    if torch.compiler.is_compiling():
        args = (*_distinct(args[:8]), *args[8:])
    n, c, s = x.shape
    if s >= _SHORT_ROW or n == 1:
        return _MixtureMomentsFunction.apply(x.contiguous(), *args)
    # short rows (e.g. (N, C) features): one row of N * S values per channel fills the vectors
    xt = x.transpose(0, 1).reshape(1, c, n * s).contiguous()
    y, *stats = _MixtureMomentsFunction.apply(xt, *args)
    return y.reshape(c, n, s).transpose(0, 1), *stats

