"""philox_dropout's CUDA kernel, run on the CPU by the CUDA emulator (tests/cuda_emu).

The binding (tests/cuda_emu/emu_dropout.cpp) runs the launch sequence of csrc/cuda/dropout.cuh
that dropout.cu runs on a GPU. The rule is integer arithmetic and one rounded product, so the
emulated output must equal the reference bit for bit in every dtype: sizes that end inside a
group, inside a warp's span and exactly on a group; the grid-stride loop (a capped grid); every
block schedule. Outputs live between sentinel guards, so a write out of bounds shows up.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_emulated
from test_cuda_emu_dwconv_ln import DTYPE_CODE, Guarded
from test_dropout import same_bits

from streamssl.ops import reference


@pytest.fixture(scope="module")
def emu():
    return load_emulated("emu_dropout.cpp")


pytestmark = pytest.mark.usefixtures("emu_default_schedule")


def emu_dropout(emu, x, p, seed, max_grid=0):
    out = Guarded(x.shape, x.dtype)
    emu.fn("emu_dropout", x, out.t, x.numel(), DTYPE_CODE[x.dtype], p, seed, max_grid)
    return out.check("y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100, 2049, 8195])
def test_emulated_kernel_equals_the_reference(emu, n, dtype):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    for p, seed in ((0.1, 5), (0.5, -7), (1 - 2.0**-33, 2**62)):
        assert same_bits(emu_dropout(emu, x, p, seed), reference.dropout(x, p, seed)), (p, seed)


@pytest.mark.parametrize("max_grid", [1, 3])
def test_grid_stride_loop(emu, max_grid):
    """A grid of 1 or 3 blocks of 256 threads walks 4 * 8195 elements' Philox blocks in strides."""
    x = torch.randn(4 * 8195)
    assert same_bits(emu_dropout(emu, x, 0.2, 17, max_grid), reference.dropout(x, 0.2, 17))


@pytest.mark.parametrize("schedule", ["reverse", "random:0"])
def test_same_bits_under_any_block_schedule(emu, schedule):
    x = torch.randn(9000)
    first = emu_dropout(emu, x, 0.3, 1, max_grid=4)
    emu.set_schedule(schedule)
    assert same_bits(emu_dropout(emu, x, 0.3, 1, max_grid=4), first)


def test_binding_refuses_bad_arguments(emu):
    x = torch.randn(10)
    with pytest.raises(Exception, match="p must be"):
        emu.fn("emu_dropout", x, torch.empty(10), 10, 0, 1.0, 1, 0)
