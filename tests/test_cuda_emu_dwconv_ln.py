"""causal_dwconv_ln's CUDA kernels, run on the CPU by the CUDA emulator (tests/cuda_emu).

The bindings (tests/cuda_emu/emu_dwconv_ln.cpp) run the very launch sequences of
csrc/cuda/dwconv_ln.cuh that dwconv_ln.cu runs on a GPU. The emulated forward, backward and
streaming step are compared with the float64 reference under the tolerances of
tests/test_dwconv_ln.py (derived there from each dtype's unit roundoff), and with the CPU kernel.
Shapes are small (every emulated thread hand-off costs about a microsecond) but reach every
code path: aligned 16-byte vectors and the element-wise path (C not a multiple of the vector, or
a misaligned x), one and several warps per row, one to eight vectors per thread, missing cache
and bias, K = 1 up to 33 (two passes of the column kernel), and several column tiles per
sequence. Every output lives in a buffer with sentinel guards on both sides, so a write out of
bounds shows up.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_emulated

import streamssl.ops as ops
from streamssl.ops import reference
from test_dwconv_ln import fwd_tol, grad_tol, make_inputs


DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
HAS_EXTENSION = ops.backend() != "reference"


GUARD = 16  # elements of sentinel before and after every output buffer


@pytest.fixture(scope="module")
def emu():
    return load_emulated("emu_dwconv_ln.cpp")


pytestmark = pytest.mark.usefixtures("emu_default_schedule")


class Guarded:
    """An output of `shape` inside a buffer of sentinel bytes (0xA5: NaN-like in every float
    dtype we use); `check()` returns the payload after asserting the guards are intact."""

    def __init__(self, shape, dtype):
        n = 1
        for d in shape:
            n *= d
        self.shape, self.n = tuple(shape), n
        self.buf = torch.empty(n + 2 * GUARD, dtype=dtype)
        self.buf.view(torch.uint8).fill_(0xA5)
        self.before = self.buf.clone()
        self.t = self.buf[GUARD : GUARD + n].view(self.shape)

    def check(self, name):
        b, e = GUARD, GUARD + self.n
        assert self.buf[:b].view(torch.uint8).equal(self.before[:b].view(torch.uint8)), f"write before {name}"
        assert self.buf[e:].view(torch.uint8).equal(self.before[e:].view(torch.uint8)), f"write after {name}"
        return self.t.clone()


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    k = next(i for i in range(1, 16) if (buf.data_ptr() + i * t.element_size()) % 16)
    out = buf[k : k + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def codes(x, w, b, lw, lb):
    return [DTYPE_CODE[t.dtype] for t in (x, w, b if b is not None else w, lw, lb)]


def workspace(emu, B, T, C, K, dtype, backward):
    n = torch.zeros(1, dtype=torch.int64)
    emu.fn("emu_dwconv_ln_workspace_bytes", B, T, C, K, DTYPE_CODE[dtype], int(backward), n)
    return torch.empty(int(n), dtype=torch.uint8)


def emu_forward(emu, x, w, b, lw, lb, c, *, eps=1e-5, swish=True):
    B, T, C = x.shape
    K = w.shape[1]
    outs = [Guarded((B, T, C), x.dtype), Guarded((B, K - 1, C), x.dtype),
            Guarded((B, T), acc_dtype(x.dtype)), Guarded((B, T), acc_dtype(x.dtype))]
    ws = workspace(emu, B, T, C, K, x.dtype, False)
    emu.fn("emu_dwconv_ln_forward", x, w, b, lw, lb, c, B, T, C, K, *codes(x, w, b, lw, lb), eps, int(swish),
           *(o.t for o in outs), ws)
    return tuple(o.check(name) for o, name in zip(outs, ("y", "new_cache", "mean", "rstd")))


def emu_backward(emu, gy, x, w, b, lw, lb, c, mean, rstd, *, swish=True):
    B, T, C = x.shape
    K = w.shape[1]
    outs = [Guarded(x.shape, x.dtype), Guarded(w.shape, w.dtype), Guarded((C,), (b if b is not None else w).dtype),
            Guarded(lw.shape, lw.dtype), Guarded(lb.shape, lb.dtype)]
    ws = workspace(emu, B, T, C, K, x.dtype, True)
    emu.fn("emu_dwconv_ln_backward", gy, x, w, b, lw, lb, c, mean, rstd, B, T, C, K, *codes(x, w, b, lw, lb),
           int(swish), *(o.t for o in outs), ws)
    return tuple(o.check(name) for o, name in zip(outs, ("grad_x", "grad_weight", "grad_bias", "grad_ln_weight",
                                                         "grad_ln_bias")))


def reference_all(x, w, b, lw, lb, c, gy, swish=True):
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, w, b, lw, lb)]
    y, new_cache = reference.causal_dwconv_ln(*leaves, None if c is None else c.double(),
                                              activation="swish" if swish else None)
    y.backward(gy.double())
    return y.detach(), new_cache, [None if t is None else t.grad for t in leaves]


def check_forward(y, new_cache, y_ref, cache_ref, dtype, K):
    tol = fwd_tol(dtype, K)
    err = (y.double() - y_ref).abs()
    assert bool((err <= tol + tol * y_ref.abs()).all()), f"y: max error {err.max():.3g} (tol {tol:.3g})"
    assert torch.equal(new_cache, cache_ref.to(dtype))


def check_grads(grads, grads_ref, dtype, B, T, C, K):
    gtol = grad_tol(dtype, B, T, C, K)
    for name, g, g_ref in zip(("x", "weight", "bias", "ln_weight", "ln_bias"), grads, grads_ref):
        if g_ref is None:
            continue
        scale = max(g_ref.abs().max().item(), 1.0)
        err = (g.double() - g_ref).abs().max().item()
        assert err <= gtol * scale, f"d{name}: error {err:.3g} > {gtol:.3g} * {scale:.3g}"


# (B, T, C, K, cache, bias, swish). fp32 rows wider than 512 channels take two warps per row.
CASES = [
    (2, 5, 64, 3, True, True, True),     # aligned vectors, one vector per thread
    (3, 4, 37, 9, False, True, True),    # odd C: element-wise loads and stores
    (1, 6, 200, 5, True, False, False),  # several vectors per thread, no bias, no swish
    (2, 3, 600, 4, True, True, True),    # two warps per row (shared-memory reductions)
    (1, 3, 8, 1, False, True, True),     # K = 1
    (2, 7, 16, 33, True, True, True),    # K = 33: two passes of the column kernel; T < K-1
    (1, 70, 8, 3, False, True, True),    # several column tiles per sequence (32 frames each)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_emulated_forward_and_backward_match_the_reference(emu, case, dtype):
    B, T, C, K, with_cache, with_bias, swish = case
    x, w, b, lw, lb, c = make_inputs(B, T, C, K, dtype, cache=with_cache, bias=with_bias, seed=sum(case[:4]))
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_ref, cache_ref, grads_ref = reference_all(x, w, b, lw, lb, c, gy, swish)
    y, new_cache, mean, rstd = emu_forward(emu, x, w, b, lw, lb, c, swish=swish)
    check_forward(y, new_cache, y_ref, cache_ref, dtype, K)
    grads = emu_backward(emu, gy, x, w, b, lw, lb, c, mean, rstd, swish=swish)
    check_grads(grads, grads_ref, dtype, B, T, C, K)
    if HAS_EXTENSION:
        # The CPU kernel's statistics: the same formulas, so float32 agreement to a few roundings.
        _, _, mean_cpu, rstd_cpu = torch.ops.streamssl.causal_dwconv_ln(x, w, b, lw, lb, c, 1e-5, swish)
        tol = fwd_tol(torch.float64 if dtype == torch.float64 else torch.float32, K)
        torch.testing.assert_close(mean, mean_cpu, rtol=tol, atol=tol)
        torch.testing.assert_close(rstd, rstd_cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_parameters_with_reduced_activations(emu, dtype):
    B, T, C, K = 2, 4, 24, 5
    x, w, b, lw, lb, c = make_inputs(B, T, C, K, dtype, param_dtype=torch.float32)
    gy = torch.randn(B, T, C).to(dtype)
    y_ref, cache_ref, grads_ref = reference_all(x, w, b, lw, lb, c, gy)
    y, new_cache, mean, rstd = emu_forward(emu, x, w, b, lw, lb, c)
    check_forward(y, new_cache, y_ref, cache_ref, dtype, K)
    grads = emu_backward(emu, gy, x, w, b, lw, lb, c, mean, rstd)
    assert all(g.dtype == torch.float32 for g in grads[1:])
    check_grads(grads, grads_ref, dtype, B, T, C, K)


def vec_ok(emu, x, c, out, C):
    flag = torch.zeros(1, dtype=torch.int64)
    emu.fn("emu_dwconv_ln_rows_vec_ok", x, c, out, C, DTYPE_CODE[x.dtype], flag)
    return bool(flag)


def test_misaligned_rows_take_the_element_path(emu):
    """With C a multiple of the vector but x one element off alignment, the kernels must not use
    16-byte accesses (the emulator would not fault on one; a GPU would), and give the same bits."""
    B, T, C, K = 2, 4, 32, 3
    x, w, b, lw, lb, c = make_inputs(B, T, C, K)
    gy = torch.randn(B, T, C)
    assert vec_ok(emu, x, c, torch.empty_like(x), C)
    assert not vec_ok(emu, misaligned(x), c, torch.empty_like(x), C)
    assert not vec_ok(emu, x, misaligned(c), torch.empty_like(x), C)
    assert not vec_ok(emu, x, c, torch.empty_like(x), C + 1)
    y, nc, mean, rstd = emu_forward(emu, x, w, b, lw, lb, c)
    y2, nc2, mean2, rstd2 = emu_forward(emu, misaligned(x), w, b, lw, lb, misaligned(c))
    assert torch.equal(y, y2) and torch.equal(nc, nc2) and torch.equal(mean, mean2)
    g = emu_backward(emu, gy, x, w, b, lw, lb, c, mean, rstd)
    g2 = emu_backward(emu, misaligned(gy), misaligned(x), w, b, lw, lb, c, mean, rstd)
    assert all(torch.equal(a, e) for a, e in zip(g, g2))


@pytest.mark.parametrize("B", [1, 16])
def test_emulated_streaming_step_is_bit_identical(emu, B):
    """Chunks fed with the returned cache give exactly the full-sequence output (and the CPU's)."""
    T, C, K = 12, 32, 9
    x, w, b, lw, lb, _ = make_inputs(B, T, C, K, cache=False)
    y_full, cache_full, _, _ = emu_forward(emu, x, w, b, lw, lb, None)
    cache, outs, t = None, [], 0
    for n in (1, 3, 8):
        y, cache, _, _ = emu_forward(emu, x[:, t : t + n].contiguous(), w, b, lw, lb, cache)
        outs.append(y)
        t += n
    assert torch.equal(torch.cat(outs, 1), y_full)
    assert torch.equal(cache, cache_full)
    if HAS_EXTENSION:
        y_cpu, cache_cpu = ops.causal_dwconv_ln(x, w, b, lw, lb)
        tol = fwd_tol(torch.float32, K)
        torch.testing.assert_close(y_full, y_cpu, rtol=2 * tol, atol=2 * tol)
        assert torch.equal(cache_full, cache_cpu)


def test_gradients_do_not_depend_on_the_schedule(emu):
    """No atomics and fixed reduction orders: every thread interleaving gives the same bits."""
    B, T, C, K = 2, 40, 24, 5
    x, w, b, lw, lb, c = make_inputs(B, T, C, K)
    gy = torch.randn(B, T, C)
    _, _, mean, rstd = emu_forward(emu, x, w, b, lw, lb, c)
    results = []
    for spec in ("forward", "reverse", "random:1"):
        with emu.schedule(spec):
            results.append(emu_backward(emu, gy, x, w, b, lw, lb, c, mean, rstd))
    for r in results[1:]:
        assert all(torch.equal(a, e) for a, e in zip(r, results[0]))


def test_bad_problem_is_refused(emu):
    x, w, b, lw, lb, c = make_inputs(1, 2, 4, 3)
    y = torch.empty_like(x)
    stats = torch.empty(1, 2)
    with pytest.raises(RuntimeError, match="bad shape"):
        emu.fn("emu_dwconv_ln_forward", x, w, b, lw, lb, c, 1, 2, 4, 0, 0, 0, 0, 0, 0, 1e-5, 1,
               y, c, stats, stats, torch.empty(4096, dtype=torch.uint8))
