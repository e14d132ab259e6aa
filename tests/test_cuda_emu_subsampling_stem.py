"""The subsampling stem's fused-backward CUDA kernels, run on the CPU by the CUDA emulator.

The binding (tests/cuda_emu/emu_subsampling_stem.cpp) runs the launch sequence of
csrc/cuda/subsampling_stem.cuh that subsampling_stem.cu runs on a GPU. Results are compared with
the float64 reference under the summation bound of tests/test_subsampling_stem.py. Shapes reach
one and several channel blocks (C up to and past the 128 threads of a block), one and several
stage-0 frames per tile (more than 1024 frames), both time paddings and an empty problem; every
output lives between sentinel guards, so a write out of bounds shows up.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_emulated
from test_cuda_emu_dwconv_ln import Guarded
from test_subsampling_stem import assert_within_bound, make_inputs


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

