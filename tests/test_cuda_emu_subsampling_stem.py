"""The subsampling stem's CUDA kernels, run on the CPU by the CUDA emulator.

The bindings (tests/cuda_emu/emu_subsampling_stem.cpp) run the launch sequences of
csrc/cuda/subsampling_stem.cuh that subsampling_stem.cu runs on a GPU. Results are compared with
the float64 references under the summation bounds of tests/test_subsampling_stem.py, and the
forward with the CPU kernel (both sum in tap order). Shapes reach
one and several channel blocks (C up to and past the 128 threads of a block), one and several
stage-0 frames per tile (more than 1024 frames), both time paddings and an empty problem; every
output lives between sentinel guards, so a write out of bounds shows up.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_emulated
from test_cuda_emu_dwconv_ln import Guarded
from test_subsampling_stem import assert_within_bound, make_forward_inputs, make_inputs

import streamssl.ops as ops
from streamssl.ops import reference


@pytest.fixture(scope="module")
def emu():
    return load_emulated("emu_subsampling_stem.cpp")


pytestmark = pytest.mark.usefixtures("emu_default_schedule")


def emu_backward(emu, grad_y1, y0, feats, w1, pad):
    B, T, Fq = feats.shape
    C = y0.shape[3]
    f64 = int(feats.dtype == torch.float64)
    n = torch.zeros(1, dtype=torch.int64)
    emu.fn("emu_stem_workspace_bytes", B, T, Fq, C, pad, f64, n)
    ws = torch.empty(max(int(n), 16), dtype=torch.uint8)
    outs = [Guarded((C, 3, 3), feats.dtype), Guarded((C,), feats.dtype), Guarded((C, 3, 3), feats.dtype)]
    emu.fn("emu_stem_backward", grad_y1, y0, feats, w1, B, T, Fq, C, pad, f64, *(o.t for o in outs), ws)
    return [o.check(name) for o, name in zip(outs, ("grad_w0", "grad_b0", "grad_w1"))]


CASES = [
    # B, T, F, C, time_padding
    (2, 17, 9, 5, 1),
    (1, 8, 5, 3, 0),
    (2, 9, 6, 130, 1),  # two channel blocks, the second mostly idle
    (2, 2050, 5, 2, 1),  # 2050 stage-0 frames: two per tile
    (1, 2, 4, 8, 0),  # no stage-0 frame: the reduce kernel writes zeros
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_emulated_backward_matches_the_reference(emu, case, dtype):
    B, T, Fq, C, pad = case
    args = make_inputs(B, T, Fq, C, pad, dtype, seed=5)
    assert_within_bound(emu_backward(emu, *args, pad), *args, pad)


@pytest.mark.parametrize("schedule", ["reverse", "random:0"])
def test_same_bits_under_any_block_schedule(emu, schedule):
    """No atomics and a fixed tile order: the emulator's block order does not change a bit."""
    args = make_inputs(2, 2050, 5, 3, 1, torch.float32, seed=2)
    first = emu_backward(emu, *args, 1)
    emu.set_schedule(schedule)
    for a, b in zip(first, emu_backward(emu, *args, 1)):
        assert torch.equal(a, b)


def emu_forward(emu, feats, w0, b0, lengths0, pad):
    B, T, Fq = feats.shape
    C = w0.shape[0]
    T0, F0 = (0 if T + 2 * pad < 3 else (T + 2 * pad - 3) // 2 + 1), (Fq - 1) // 2 + 1
    out = Guarded((B, T0, F0, C), feats.dtype)
    emu.fn("emu_stem_forward", feats, w0, b0, lengths0, B, T, Fq, C, pad, int(feats.dtype == torch.float64), out.t)
    return out.check("y0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_emulated_forward_matches_the_reference_and_the_cpu_kernel(emu, case, dtype):
    B, T, Fq, C, pad = case
    args = make_forward_inputs(B, T, Fq, C, pad, dtype, seed=4)
    y0 = emu_forward(emu, *args, pad)
    exact = reference.subsampling_stem_forward(*(t.double() for t in args[:3]), args[3], pad)
    # float32: 10 u of the absolute sum; the same bound as tests/test_subsampling_stem.py.
    scale = reference.subsampling_stem_forward(*(t.double().abs() for t in args[:3]), args[3], pad)
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-52
    assert bool(((y0.double() - exact).abs() <= 10 * u * scale).all())
    if ops.backend() != "reference" and dtype == torch.float64:
        # Both kernels add bias + w[0] x[0] + ... in tap order; float64 has no FMA contraction
        # differences large enough to matter at this tolerance, float32 may differ by FMA rounding.
        torch.testing.assert_close(y0, ops.subsampling_stem_forward(*args, pad), atol=1e-14, rtol=1e-14)
