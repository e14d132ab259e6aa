"""causal_dwconv_ln: the C++ (and, with a GPU, CUDA) kernels against the float64 reference.

Tolerances (in the style of Dao-AILab/causal-conv1d's tests) come from the unit roundoff u of
each dtype (2^-24 float32, 2^-11 float16, 2^-8 bfloat16) and the op's arithmetic:
* The kernel and the reference get the same (dtype-rounded) inputs, so input rounding cancels.
* Forward: y is rounded once to the output dtype (relative error <= u_out), after float32
  arithmetic in which every output depends on about K + 16 roundings that matter (K tap
  products and sums; the mean, deviation, rstd, normalisation, affine map, exp, divide and
  multiply). The normalised values are O(1) but the taps are summed before the division by the
  row's standard deviation, which can amplify their rounding by the ratio of sum|w x| to std(z);
  for our random data that ratio and |h| stay below 4. Hence
      rtol = atol = u_out + 4 (K + 16) u_f32.
* Gradients add the sums of the LayerNorm backward (C / 16 terms per lane of the row sums), the
  K-tap input gradient, and the parameter reductions (a sequential sum over a tile of at most
  max(128, 16 (K - 1)) frames, then over the tiles). Gradient errors are measured against the
  largest gradient entry (the sums cancel, so entries near zero carry absolute, not relative,
  error):  |g - g_ref| <= (2 u_out + 4 (K + C / 16 + frames_per_tile + B * T / 128 + 32) u_f32)
  * max(max |g_ref|, 1), the 1 being the scale of the O(1) inputs and grad_y.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import streamssl.ops as ops
from streamssl.ops import reference
from streamssl.ops.dwconv_ln import causal_dwconv_ln

pytestmark = pytest.mark.skipif(
    ops.backend() == "reference", reason="the C++ extension is not built (reference backend)"
)

U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
U32 = U[torch.float32]
OP = torch.ops.streamssl.causal_dwconv_ln
OP_BWD = torch.ops.streamssl.causal_dwconv_ln_backward
HAS_CUDA = torch.cuda.is_available() and ops.backend() == "cuda+cpu"


def fwd_tol(dtype: torch.dtype, K: int) -> float:
    u_acc = U[torch.float64] if dtype == torch.float64 else U32
    return U[dtype] + 4 * (K + 16) * u_acc


def grad_tol(dtype: torch.dtype, B: int, T: int, C: int, K: int) -> float:
    u_acc = U[torch.float64] if dtype == torch.float64 else U32
    tile = max(128, 16 * (K - 1))
    return 2 * U[dtype] + 4 * (K + C / 16 + tile + B * T / 128 + 32) * u_acc


def make_inputs(B, T, C, K, dtype=torch.float32, *, cache=True, bias=True, seed=0, param_dtype=None):
    """Random inputs; parameters at the scale of a trained Conformer conv module."""
    g = torch.Generator().manual_seed(seed)
    pdt = param_dtype or dtype

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dt)

    x = rnd(B, T, C)
    weight = rnd(C, K, scale=K**-0.5, dt=pdt)
    b = rnd(C, scale=0.1, dt=pdt) if bias else None
    ln_w = rnd(C, scale=0.2, shift=1.0, dt=pdt)
    ln_b = rnd(C, scale=0.2, dt=pdt)
    c = rnd(B, K - 1, C) if cache else None
    return x, weight, b, ln_w, ln_b, c


def run_reference(x, weight, b, ln_w, ln_b, c, grad_y, activation="swish"):
    """Forward and all gradients in float64 from the same (dtype-rounded) inputs."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight, b, ln_w, ln_b)]
    y, new_cache = reference.causal_dwconv_ln(
        *leaves, None if c is None else c.double(), activation=activation
    )
    y.backward(grad_y.double())
    return y.detach(), new_cache, [None if t is None else t.grad for t in leaves]


def run_kernel(x, weight, b, ln_w, ln_b, c, grad_y, activation="swish"):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, weight, b, ln_w, ln_b)]
    y, new_cache = causal_dwconv_ln(*leaves, c, activation=activation)
    y.backward(grad_y)
    return y.detach(), new_cache, [None if t is None else t.grad for t in leaves]


def assert_close_to_reference(got, ref, dtype, B, T, C, K, *, param_dtypes=None):
    y, new_cache, grads = got
    y_ref, cache_ref, grads_ref = ref
    tol = fwd_tol(dtype, K)
    err = (y.double() - y_ref).abs()
    bound = tol + tol * y_ref.abs()
    assert y.dtype == dtype
    assert bool((err <= bound).all()), f"y: max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"
    assert torch.equal(new_cache, cache_ref.to(dtype)), "new_cache must be the last K-1 frames, exactly"
    gtol = grad_tol(dtype, B, T, C, K)
    names = ("x", "weight", "bias", "ln_weight", "ln_bias")
    for i, (name, g, g_ref) in enumerate(zip(names, grads, grads_ref)):
        if g_ref is None:
            assert g is None
            continue
        expected_dtype = dtype if i == 0 or param_dtypes is None else param_dtypes
        assert g.dtype == expected_dtype, f"grad of {name} has dtype {g.dtype}"
        # Inputs and grad_y are O(1): a gradient that cancels to ~0 (C = 1, where the normalised
        # output is constant) is held to the O(1) scale of the terms it is made of.
        scale = max(g_ref.abs().max().item(), 1.0)
        err = (g.double() - g_ref).abs().max().item()
        assert err <= gtol * scale, f"d{name}: error {err:.3g} > {gtol:.3g} * {scale:.3g}"


# (B, T, C, K): T = 1, T < K-1, C = 1, odd C, C = 1000, K = 1, 3, 9, 31, B = 1 and 33, and sequences
# long enough for several backward tiles per sequence (the K-1 frame halo between tiles).
SHAPES = [
    (1, 1, 8, 3),
    (2, 3, 16, 9),
    (1, 7, 1, 5),
    (3, 20, 37, 9),
    (2, 16, 1000, 3),
    (2, 40, 24, 1),
    (2, 50, 40, 31),
    (33, 6, 12, 3),
    (2, 300, 64, 9),
    (1, 1000, 16, 31),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    B, T, C, K = shape
    # Vary the optional parts with the shape so that every combination shows up somewhere.
    h = sum(shape)
    cache, bias, activation = h % 2 == 0, h % 3 != 0, "swish" if h % 5 else None
    x, w, b, lw, lb, c = make_inputs(B, T, C, K, dtype, cache=cache, bias=bias, seed=h)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(h + 1)).to(dtype)
    got = run_kernel(x, w, b, lw, lb, c, gy, activation)
    ref = run_reference(x, w, b, lw, lb, c, gy, activation)
    assert_close_to_reference(got, ref, dtype, B, T, C, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_parameters_with_reduced_activations(dtype):
    """Autocast training hands the op float32 master weights and half-precision activations."""
    B, T, C, K = 2, 30, 20, 9
    x, w, b, lw, lb, c = make_inputs(B, T, C, K, dtype, param_dtype=torch.float32)
    gy = torch.randn(B, T, C).to(dtype)
    got = run_kernel(x, w, b, lw, lb, c, gy)
    ref = run_reference(x, w, b, lw, lb, c, gy)
    assert_close_to_reference(got, ref, dtype, B, T, C, K, param_dtypes=torch.float32)


def test_float64_is_exact_to_float64_precision():
    B, T, C, K = 2, 150, 10, 5
    x, w, b, lw, lb, c = make_inputs(B, T, C, K, torch.float64)
    gy = torch.randn(B, T, C, dtype=torch.float64)
    got = run_kernel(x, w, b, lw, lb, c, gy)
    ref = run_reference(x, w, b, lw, lb, c, gy)
    assert_close_to_reference(got, ref, torch.float64, B, T, C, K)


def test_non_contiguous_inputs_are_handled():
    B, T, C, K = 2, 12, 6, 4
    x, w, b, lw, lb, c = make_inputs(B, T, C, K)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, C) view of a (B, C, T) buffer
    w_nc = w.t().contiguous().t()
    c_nc = c.transpose(1, 2).contiguous().transpose(1, 2)
    lw_nc = torch.stack([lw, lw], 1)[:, 0]
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or c_nc.is_contiguous() or lw_nc.is_contiguous())
    y, nc = causal_dwconv_ln(x, w, b, lw, lb, c)
    y2, nc2 = causal_dwconv_ln(x_nc, w_nc, b, lw_nc, lb, c_nc)
    assert torch.equal(y, y2) and torch.equal(nc, nc2)
    assert y2.is_contiguous() and nc2.is_contiguous()
    # and the backward with a non-contiguous incoming gradient
    gy = torch.randn(B, C, T).transpose(1, 2)
    grads = []
    for args in ((x, w, b, lw, lb, c), (x_nc, w_nc, b, lw_nc, lb, c_nc)):
        leaves = [t.detach().clone().requires_grad_(True) if i < 5 else t for i, t in enumerate(args)]
        causal_dwconv_ln(*leaves)[0].backward(gy)
        grads.append([t.grad for t in leaves[:5]])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_gradcheck_float64_through_the_op():
    # T = 130 > 128 frames: two backward tiles per sequence, so the halo between them is checked.
    for B, T, C, K, with_cache in ((2, 5, 4, 3, True), (1, 130, 3, 3, False)):
        x, w, b, lw, lb, c = make_inputs(B, T, C, K, torch.float64, cache=with_cache)
        inputs = tuple(t.requires_grad_(True) for t in (x, w, b, lw, lb))
        assert torch.autograd.gradcheck(lambda *a: causal_dwconv_ln(*a, c)[0], inputs, eps=1e-6, atol=1e-7)
    # swish off, no bias
    x, w, _, lw, lb, c = make_inputs(2, 6, 5, 4, torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, lw, lb))
    assert torch.autograd.gradcheck(
        lambda x, w, lw, lb: causal_dwconv_ln(x, w, None, lw, lb, c, activation=None)[0], inputs
    )


def test_cache_gets_no_gradient():
    x, w, b, lw, lb, c = make_inputs(1, 4, 3, 3)
    c.requires_grad_(True)
    x.requires_grad_(True)
    y, new_cache = causal_dwconv_ln(x, w, b, lw, lb, c)
    assert not new_cache.requires_grad
    y.sum().backward()
    assert c.grad is None and x.grad is not None


@pytest.mark.parametrize("with_cache,with_bias", [(True, True), (False, False)])
def test_opcheck_forward(with_cache, with_bias):
    x, w, b, lw, lb, c = make_inputs(2, 7, 5, 3, cache=with_cache, bias=with_bias)
    for t in (x, w, b, lw, lb):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(OP.default, (x, w, b, lw, lb, c, 1e-5, True))


def test_opcheck_backward():
    x, w, b, lw, lb, c = make_inputs(2, 7, 5, 3)
    _, _, mean, rstd = OP(x, w, b, lw, lb, c, 1e-5, False)
    gy = torch.randn_like(x)
    torch.library.opcheck(OP_BWD.default, (gy, x, w, b, lw, lb, c, mean, rstd, False))
    torch.library.opcheck(OP_BWD.default, (gy, x, w, None, lw, lb, None, mean, rstd, True))


def test_saved_statistics_are_the_layernorm_statistics():
    x, w, b, lw, lb, c = make_inputs(2, 9, 7, 3, torch.float64)
    _, _, mean, rstd = OP(x, w, b, lw, lb, c, 1e-5, True)
    z = F.conv1d(torch.cat([c, x], 1).transpose(1, 2), w.unsqueeze(1), b, groups=7).transpose(1, 2)
    torch.testing.assert_close(mean, z.mean(-1))
    torch.testing.assert_close(rstd, (z.var(-1, unbiased=False) + 1e-5).rsqrt())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_streaming_is_bit_identical(dtype):
    rng = random.Random(7)
    for B, T, C, K in ((3, 97, 40, 9), (2, 40, 13, 31), (1, 25, 8, 1)):
        x, w, b, lw, lb, _ = make_inputs(B, T, C, K, dtype, cache=False, seed=T)
        y_full, cache_full = causal_dwconv_ln(x, w, b, lw, lb)
        for _ in range(3):
            cache, outs, t = None, [], 0
            while t < T:
                n = rng.choice([1, 2, 3, max(1, K - 2), 8, 17])
                y, cache = causal_dwconv_ln(x[:, t : t + n], w, b, lw, lb, cache)
                outs.append(y)
                t += n
            assert torch.equal(torch.cat(outs, 1), y_full)
            assert torch.equal(cache, cache_full)


def test_first_chunk_without_cache_equals_zero_cache():
    x, w, b, lw, lb, c = make_inputs(2, 5, 6, 4)
    y1, n1 = causal_dwconv_ln(x, w, b, lw, lb, None)
    y2, n2 = causal_dwconv_ln(x, w, b, lw, lb, torch.zeros_like(c))
    assert torch.equal(y1, y2) and torch.equal(n1, n2)


def test_empty_chunk_passes_the_cache_through():
    x, w, b, lw, lb, c = make_inputs(2, 0, 6, 4)
    y, new_cache = causal_dwconv_ln(x, w, b, lw, lb, c)
    assert y.shape == (2, 0, 6) and torch.equal(new_cache, c)


def test_backward_is_deterministic_across_runs_and_thread_counts():
    B, T, C, K = 3, 700, 24, 9  # several tiles per sequence
    x, w, b, lw, lb, c = make_inputs(B, T, C, K)
    _, _, mean, rstd = OP(x, w, b, lw, lb, c, 1e-5, True)
    gy = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads, 3):
            torch.set_num_threads(n)
            results.append(OP_BWD(gy, x, w, b, lw, lb, c, mean, rstd, True))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, e in zip(r, results[0]):
            assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------------
# Bad inputs: the public function (and the reference path) and the op itself name the argument.
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    x, w, b, lw, lb, c = make_inputs(2, 5, 4, 3)
    meta = torch.device("meta")
    return [
        ("x", (x[0], w, b, lw, lb, c)),
        ("x", (x.to(torch.int32), w, b, lw, lb, c)),
        ("x", (x[:, :, :0], w[:0], b[:0], lw[:0], lb[:0], None)),
        ("weight", (x, w[:, 0], b, lw, lb, c)),
        ("weight", (x, w[:3], b, lw, lb, c)),
        ("weight", (x, w[:, :0], b, lw, lb, None)),  # K < 1
        ("weight", (x, w.double(), b, lw, lb, c)),
        ("weight", (x, w.to(meta), b, lw, lb, c)),
        ("bias", (x, w, b[:3], lw, lb, c)),
        ("bias", (x, w, b.view(2, 2), lw, lb, c)),
        ("bias", (x, w, b.to(meta), lw, lb, c)),
        ("ln_weight", (x, w, b, lw[:2], lb, c)),
        ("ln_weight", (x, w, b, lw.half(), lb, c)),
        ("ln_bias", (x, w, b, lw, lb.to(meta), c)),
        ("cache", (x, w, b, lw, lb, c[:, :1])),
        ("cache", (x, w, b, lw, lb, c[0])),
        ("cache", (x, w, b, lw, lb, c.double())),
        ("cache", (x, w, b, lw, lb, c.to(meta))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_argument(case):
    name, args = _bad_cases()[case]
    named = rf"\b{name} (must|is on)"
    with pytest.raises(ValueError, match=named):
        causal_dwconv_ln(*args)
    with pytest.raises(ValueError, match=named):
        OP(*args, 1e-5, True)
    with pytest.raises(ValueError, match=named):
        reference_checked(*args)


def reference_checked(*args):
    """The reference path's checks (used when the extension does not serve a device)."""
    from streamssl.ops.dwconv_ln import _check_args

    _check_args(*args)
    return reference.causal_dwconv_ln(*args)


def test_bad_eps_and_activation():
    x, w, b, lw, lb, c = make_inputs(1, 3, 4, 3)
    with pytest.raises(ValueError, match="eps"):
        OP(x, w, b, lw, lb, c, -1.0, True)
    with pytest.raises(ValueError, match="activation"):
        causal_dwconv_ln(x, w, b, lw, lb, c, activation="relu")


def test_backward_op_checks_its_extra_arguments():
    x, w, b, lw, lb, c = make_inputs(2, 5, 4, 3)
    _, _, mean, rstd = OP(x, w, b, lw, lb, c, 1e-5, True)
    gy = torch.randn_like(x)
    with pytest.raises(ValueError, match="grad_y"):
        OP_BWD(gy[:, :4], x, w, b, lw, lb, c, mean, rstd, True)
    with pytest.raises(ValueError, match="grad_y"):
        OP_BWD(gy.double(), x, w, b, lw, lb, c, mean, rstd, True)
    with pytest.raises(ValueError, match="mean"):
        OP_BWD(gy, x, w, b, lw, lb, c, mean[:, :3], rstd, True)
    with pytest.raises(ValueError, match="rstd"):
        OP_BWD(gy, x, w, b, lw, lb, c, mean, rstd.double(), True)


# ---------------------------------------------------------------------------------------------
# CUDA against the CPU kernel (skipped without a GPU).
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + [(4, 33, 4096, 9), (2, 64, 8192, 3)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_cpu(shape, dtype):
    B, T, C, K = shape
    h = sum(shape)
    x, w, b, lw, lb, c = make_inputs(B, T, C, K, dtype, cache=h % 2 == 0, bias=h % 3 != 0, seed=h)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(h)).to(dtype)
    cpu = run_kernel(x, w, b, lw, lb, c, gy)
    cu = run_kernel(*(None if t is None else t.cuda() for t in (x, w, b, lw, lb, c)), gy.cuda())
    ref = run_reference(x, w, b, lw, lb, c, gy)
    # Both are compared with the float64 reference under the same budget.
    assert_close_to_reference(
        (cu[0].cpu(), cu[1].cpu(), [None if g is None else g.cpu() for g in cu[2]]), ref, dtype, B, T, C, K
    )
    assert_close_to_reference(cpu, ref, dtype, B, T, C, K)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_streaming_and_determinism(dtype):
    B, T, C, K = 16, 64, 256, 9
    x, w, b, lw, lb, _ = make_inputs(B, T, C, K, dtype, cache=False)
    x, w, b, lw, lb = (t.cuda() for t in (x, w, b, lw, lb))
    y_full, cache_full = causal_dwconv_ln(x, w, b, lw, lb)
    cache, outs = None, []
    for t in range(0, T, 8):
        y, cache = causal_dwconv_ln(x[:, t : t + 8], w, b, lw, lb, cache)
        outs.append(y)
    assert torch.equal(torch.cat(outs, 1), y_full) and torch.equal(cache, cache_full)
    _, _, mean, rstd = OP(x, w, b, lw, lb, None, 1e-5, True)
    gy = torch.randn_like(x)
    r1 = OP_BWD(gy, x, w, b, lw, lb, None, mean, rstd, True)
    r2 = OP_BWD(gy, x, w, b, lw, lb, None, mean, rstd, True)
    assert all(torch.equal(a, e) for a, e in zip(r1, r2))


# ---------------------------------------------------------------------------------------------
# The baseline (non-AVX2) variant of the CPU loops, which this machine would otherwise never run.
# ---------------------------------------------------------------------------------------------

_BASELINE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_dwconv_ln as t
from streamssl.ops.dwconv_ln import causal_dwconv_ln
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for B, T, C, K in ((2, 40, 37, 9), (1, 300, 64, 3), (2, 20, 24, 31)):
        x, w, b, lw, lb, c = t.make_inputs(B, T, C, K, dtype, seed=T)
        gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(T)).to(dtype)
        t.assert_close_to_reference(t.run_kernel(x, w, b, lw, lb, c, gy), t.run_reference(x, w, b, lw, lb, c, gy),
                                    dtype, B, T, C, K)
    y, cache = causal_dwconv_ln(x, w, b, lw, lb, None)
    parts, cc = [], None
    for s in range(0, 20, 3):
        yy, cc = causal_dwconv_ln(x[:, s:s + 3], w, b, lw, lb, cc)
        parts.append(yy)
    assert torch.equal(torch.cat(parts, 1), y) and torch.equal(cc, cache)
print("baseline ok")
"""


def test_baseline_cpu_variant_matches_reference():
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, STREAMSSL_CPU_BASELINE="1")
    tests_dir = str(pathlib.Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, tests_dir], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "baseline ok" in proc.stdout, proc.stdout + proc.stderr
