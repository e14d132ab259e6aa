"""Self-tests of the CUDA emulator (tests/cuda_emu): its built-ins against numpy/torch, its
schedules, its error detection, and proof that it can fail (a missing __syncthreads and a wrong
shuffle lane give wrong answers; ThreadSanitizer reports the race). The self-test kernels are real
CUDA: test_selftest_kernels_compile_with_nvcc compiles them with nvcc for sm_80 and sm_90.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_emulated

try:
    from cuda_emu import SCHEDULES, CompilerNotFound, EmuError, build, cache_dir, compile_command
    from cuda_emu.build import CSRC_DIR, EMU_DIR, TORCH_NVCC_DEFINES
except ImportError:  # tests/ imported as a package
    from tests.cuda_emu import SCHEDULES, CompilerNotFound, EmuError, build, cache_dir, compile_command
    from tests.cuda_emu.build import CSRC_DIR, EMU_DIR, TORCH_NVCC_DEFINES

DETERMINISTIC = ("forward", "reverse", "random:0", "random:1")
U32 = 2**-24  # float32 unit roundoff
U64 = 2**-53  # float64 unit roundoff


@pytest.fixture(scope="session")
def emu():
    return load_emulated("emu_selftest.cpp")


pytestmark = pytest.mark.usefixtures("emu_default_schedule")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Block reduction through __shared__ + __syncthreads, and the same kernel without the barrier.
# ---------------------------------------------------------------------------------------------


def block_sum(emu, x: torch.Tensor, missing_sync: bool, max_partials: int = 64) -> float:
    partial = torch.zeros(max_partials)
    out = torch.zeros(1)
    emu.fn("emu_selftest_block_sum", x, partial, out, x.numel(), max_partials, int(missing_sync))
    return out.item()


def block_sum_bound(x: torch.Tensor, max_partials: int = 64) -> float:
    """First-order bound on float32 summation error: each thread adds its grid-stride terms in
    sequence, then two 8-level trees (256 threads) combine them: gamma_k * sum|x| with k terms."""
    n = x.numel()
    grid = max(1, min(math.ceil(n / 256), max_partials))
    k = math.ceil(n / (grid * 256)) + 8 + 8
    return k * U32 * x.double().abs().sum().item()


@pytest.mark.parametrize("schedule", DETERMINISTIC)
@pytest.mark.parametrize("n", [1, 255, 256, 4099, 70000])
def test_block_sum_matches_float64_sum(emu, schedule, n):
    x = torch.randn(n, generator=gen(n))
    with emu.schedule(schedule):
        got = block_sum(emu, x, missing_sync=False)
    ref = x.double().sum().item()
    assert abs(got - ref) <= block_sum_bound(x)


def test_block_sum_parallel_schedule(emu):
    x = torch.randn(1500, generator=gen(7))  # OS threads are slow to hand off: small on purpose
    with emu.schedule("parallel"):
        got = block_sum(emu, x, missing_sync=False)
    assert abs(got - x.double().sum().item()) <= block_sum_bound(x)


def test_missing_syncthreads_gives_wrong_answer(emu):
    """Without the barrier, thread t reads s[t + 128] before its owner wrote it. The token schedules
    reproduce that deterministically; reverse order happens to hide it (every writer runs before its
    reader), which is why kernels are run under several schedules."""
    x = torch.randn(5000, generator=gen(11))
    ref = x.double().sum().item()
    bound = block_sum_bound(x)
    for schedule in ("forward", "random:0", "random:1", "random:2"):
        with emu.schedule(schedule):
            bad = block_sum(emu, x, missing_sync=True)
        assert not abs(bad - ref) <= bound, f"missing __syncthreads went unnoticed under {schedule}"
    with emu.schedule("reverse"):
        assert abs(block_sum(emu, x, missing_sync=True) - ref) <= bound


def test_static_shared_memory_is_poisoned_between_blocks(emu):
    """The forward schedule with the barrier missing reads s[128..255] before this block wrote it;
    those words hold 0xFF bytes (NaN), not the previous block's values (which would let the sum
    telescope back to the right answer across a grid-stride loop)."""
    x = torch.randn(10000, generator=gen(12))
    with emu.schedule("forward"):
        assert math.isnan(block_sum(emu, x, missing_sync=True))


# ---------------------------------------------------------------------------------------------
# Warp shuffles: reductions, the PTX lane arithmetic, and a wrong source lane.
# ---------------------------------------------------------------------------------------------

WARP_DTYPES = {
    "f32": (torch.float32, U32),
    "f64": (torch.float64, U64),
    "i32": (torch.int32, 0.0),
    "i64": (torch.int64, 0.0),
}


def warp_inputs(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    hi = 2**20 if dtype == torch.int32 else 2**40  # 32 terms never overflow
    return torch.randint(-hi, hi, (n,), generator=g, dtype=dtype)


def warp_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element sum of its 32-element warp chunk (float64 for floats) and the chunk's sum |x|."""
    n = x.numel()
    pad = (-n) % 32
    xp = torch.cat([x, torch.zeros(pad, dtype=x.dtype)]).view(-1, 32)
    acc = xp.double() if x.dtype.is_floating_point else xp
    s = acc.sum(1).repeat_interleave(32)[:n]
    a = acc.abs().sum(1).repeat_interleave(32)[:n].double()
    return s, a


@pytest.mark.parametrize("name", list(WARP_DTYPES))
@pytest.mark.parametrize("variant", [0, 1])  # xor butterfly, down tree + broadcast
@pytest.mark.parametrize("schedule", ["forward", "random:0"])
def test_warp_sum(emu, name, variant, schedule):
    dtype, u = WARP_DTYPES[name]
    x = warp_inputs(dtype, 1000, seed=variant)
    out = torch.empty_like(x)
    with emu.schedule(schedule):
        emu.fn(f"emu_selftest_warp_sum_{name}", x, out, x.numel(), variant)
    ref, mag = warp_sums(x)
    if dtype.is_floating_point:  # 5-level tree: gamma_5 * sum|x| per warp
        assert torch.all((out.double() - ref).abs() <= 5 * u * mag)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", [2, 3])  # __shfl_up_sync for down; broadcast from lane 1
@pytest.mark.parametrize("schedule", DETERMINISTIC)
def test_wrong_shuffle_lane_gives_wrong_answer(emu, variant, schedule):
    x = warp_inputs(torch.float32, 1024, seed=3)
    out = torch.empty_like(x)
    with emu.schedule(schedule):
        emu.fn("emu_selftest_warp_sum_f32", x, out, x.numel(), variant)
    ref, mag = warp_sums(x)
    wrong = (out.double() - ref).abs() > 5 * U32 * mag
    assert wrong.view(-1, 32).all(dim=1).all(), "a wrong source lane must corrupt every warp's result"


def shfl_reference(vals: np.ndarray, kind: int, arg: int, width: int) -> np.ndarray:
    """CUDA programming guide semantics, lane by lane, per 32-lane warp."""
    out = np.empty_like(vals)
    for w in range(0, len(vals), 32):
        for lane in range(32):
            base = (lane // width) * width
            if kind == 0:  # __shfl_sync: srcLane modulo width, within the lane's group
                src = base + arg % width
            elif kind == 1:  # __shfl_up_sync: lower delta lanes of a group keep their value
                src = lane - arg if lane - base >= arg else lane
            elif kind == 2:  # __shfl_down_sync: upper delta lanes of a group keep their value
                src = lane + arg if lane - base + arg < width else lane
            else:  # __shfl_xor_sync: may read earlier groups, reading a later group returns own
                src = lane ^ arg
                src = src if src < base + width else lane
            out[w + lane] = vals[w + src]
    return out


SHFL_ARGS = {0: [0, 1, 5, 31, 33, -1], 1: [0, 1, 2, 7, 16, 31], 2: [0, 1, 2, 7, 16, 31], 3: [0, 1, 3, 16, 31]}


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_shuffle_lane_arithmetic_int32(emu, kind):
    vals = torch.randint(-(2**31), 2**31 - 1, (64,), generator=gen(kind), dtype=torch.int32)
    out = torch.empty_like(vals)
    for width in (1, 2, 4, 8, 16, 32):
        for arg in SHFL_ARGS[kind]:
            emu.fn("emu_selftest_shfl_i32", vals, out, 64, kind, arg, width)
            ref = shfl_reference(vals.numpy(), kind, arg, width)
            assert np.array_equal(out.numpy(), ref), f"kind={kind} arg={arg} width={width}"


@pytest.mark.parametrize("binding,dtype", [("emu_selftest_shfl_f16", torch.int16), ("emu_selftest_shfl_f64", torch.int64)])
def test_shuffle_moves_2_and_8_byte_values_bit_exactly(emu, binding, dtype):
    info = torch.iinfo(dtype)
    vals = torch.randint(info.min, info.max, (96,), generator=gen(5), dtype=dtype)  # NaN patterns too
    out = torch.empty_like(vals)
    for kind, arg, width in [(3, 1, 32), (3, 16, 32), (0, 7, 8), (2, 3, 16), (1, 1, 4)]:
        emu.fn(binding, vals, out, vals.numel(), kind, arg, width)
        assert np.array_equal(out.numpy(), shfl_reference(vals.numpy(), kind, arg, width))


def test_warp_reduce_intrinsics(emu):
    x = torch.randint(-(2**31), 2**31 - 1, (128,), generator=gen(9), dtype=torch.int32)
    out = torch.empty(4 * 6, dtype=torch.int32)
    emu.fn("emu_selftest_warp_reduce", x, out, x.numel())
    xs = x.numpy().reshape(-1, 32).astype(np.int64)
    us = xs & 0xFFFFFFFF
    to_i32 = lambda v: ((v + 2**31) % 2**32 - 2**31).astype(np.int32)  # noqa: E731
    band = np.bitwise_and.reduce(us, axis=1)
    bor = np.bitwise_or.reduce(us, axis=1)
    bxor = np.bitwise_xor.reduce(us, axis=1)
    ref = np.stack(
        [xs.sum(1), xs.min(1), xs.max(1), us.min(1), us.max(1), (band ^ (bor << 1) ^ bxor) & 0xFFFFFFFF], axis=1
    )
    assert np.array_equal(out.numpy().reshape(-1, 6), to_i32(ref))


@pytest.mark.parametrize("schedule", DETERMINISTIC)
def test_syncwarp_orders_shared_memory_within_a_warp(emu, schedule):
    out = torch.full((64,), -7, dtype=torch.int32)
    with emu.schedule(schedule):
        emu.fn("emu_selftest_warp_exchange", out, 64, 0)
    assert torch.equal(out, 3 * (torch.arange(64, dtype=torch.int32) ^ 1))


def test_missing_syncwarp_is_exposed(emu):
    """Lanes do not run in lockstep here (nor on GPUs since Volta): without __syncwarp, the first
    lane of each pair reads its partner's slot before the partner wrote it."""
    ref = 3 * (torch.arange(64, dtype=torch.int32) ^ 1)
    for schedule, reader in [("forward", 0), ("reverse", 1)]:
        out = torch.full((64,), -7, dtype=torch.int32)
        with emu.schedule(schedule):
            emu.fn("emu_selftest_warp_exchange", out, 64, 1)
        wrong = out != ref
        assert torch.equal(wrong, torch.arange(64) % 2 == reader), schedule
        assert torch.all(out[wrong] == -1)  # the poison of unwritten shared memory


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:0", "parallel"])
@pytest.mark.parametrize("active", [1, 31, 33, 64])
def test_exited_threads_do_not_hold_up_barriers(emu, schedule, active):
    out = torch.full((3 * 64,), -7, dtype=torch.int32)
    with emu.schedule(schedule):
        emu.fn("emu_selftest_early_exit", out, 64, active)
    rows = out.view(64, 3).numpy()
    t = np.arange(active)
    partner = np.where((t ^ 1) < active, t ^ 1, -1)  # an exited partner reads as poison
    assert np.array_equal(rows[:active], np.stack([np.full(active, active), np.ones(active), partner], axis=1))
    assert np.all(rows[active:] == -7)


# ---------------------------------------------------------------------------------------------
# Ballot, votes and reducing barriers; atomics; dynamic shared memory; indexing.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:0"])
def test_ballot_compaction_votes_and_reducing_barriers(emu, schedule):
    n, block, thr = 1000, 256, 0.3
    x = torch.randn(n, generator=gen(21))
    x[:64] = 1.0  # two warps all true: __all_sync true
    x[256:512] = -1.0  # one block all false
    nb = math.ceil(n / block)
    rank = torch.empty(n, dtype=torch.int32)
    stats = torch.empty(4 * nb, dtype=torch.int32)
    votes = torch.empty(2 * nb * (block // 32), dtype=torch.int32)
    with emu.schedule(schedule):
        emu.fn("emu_selftest_compact", x, n, thr, rank, stats, votes)
    flags = np.zeros(nb * block, dtype=bool)
    flags[:n] = x.numpy() > np.float32(thr)
    fb = flags.reshape(nb, block)
    ref_rank = np.where(fb, np.cumsum(fb, axis=1) - 1, -1).reshape(-1)[:n]
    assert np.array_equal(rank.numpy(), ref_rank)
    ref_stats = np.stack([fb.sum(1), fb.all(1), fb.any(1), fb.sum(1)], axis=1)
    assert np.array_equal(stats.numpy().reshape(nb, 4), ref_stats)
    fw = flags.reshape(-1, 32)
    assert np.array_equal(votes.numpy().reshape(-1, 2), np.stack([fw.any(1), fw.all(1)], axis=1))


@pytest.mark.parametrize("schedule,n", [("random:0", 5000), ("reverse", 5000), ("parallel", 1500)])
def test_atomics(emu, schedule, n):
    g = gen(31)
    values = torch.randint(0, 1000, (n,), generator=g, dtype=torch.int32)
    fvalues = torch.randn(n, generator=g)
    hist = torch.zeros(37, dtype=torch.int32)
    hist64 = torch.zeros(37, dtype=torch.int64)  # unsigned long long in the kernel
    fsum = torch.zeros(1)
    dsum = torch.zeros(1, dtype=torch.float64)
    vmax = torch.full((1,), -1, dtype=torch.int32)
    fmax = torch.full((1,), -math.inf)
    total = torch.zeros(1, dtype=torch.int32)
    with emu.schedule(schedule):
        emu.fn("emu_selftest_histogram", values, fvalues, n, hist, hist64, fsum, dsum, vmax, fmax, total)
    ref = np.bincount(values.numpy() % 37, minlength=37)
    assert np.array_equal(hist.numpy(), ref) and np.array_equal(hist64.numpy(), ref)
    # Integer values below 1000 and n*1000 < 2^24: every float32 partial sum is exact, in any order.
    assert fsum.item() == dsum.item() == float(values.sum())
    assert vmax.item() == values.max().item()
    assert fmax.item() == fvalues.max().item()  # CAS loop
    assert total.item() == n


@pytest.mark.parametrize("binding,dtype", [("f32", torch.float32), ("f16", torch.float16), ("f64", torch.float64)])
@pytest.mark.parametrize("seg", [1, 7, 100, 300, 1000])
def test_dynamic_shared_memory(emu, binding, dtype, seg):
    n = 1000
    x = torch.randn(n, generator=gen(seg)).to(dtype)
    y = torch.empty_like(x)
    emu.fn(f"emu_selftest_reverse_segments_{binding}", x, y, n, seg)
    ref = torch.cat([c.flip(0) for c in x.split(seg)])
    assert torch.equal(y.view(torch.uint8), ref.view(torch.uint8))


def test_dynamic_shared_memory_limit_and_opt_in(emu):
    x = torch.randn(20000, generator=gen(41))
    y = torch.empty_like(x)
    with pytest.raises(EmuError, match="dynamic shared memory of 65536 bytes exceeds") as e:
        emu.fn("emu_selftest_reverse_segments_f32", x, y, x.numel(), 16384)  # 64 KiB > 48 KiB default
    assert e.value.code == 1
    try:
        emu.fn("emu_selftest_set_reverse_f32_max_smem", 96 * 1024)  # cudaFuncSetAttribute
        emu.fn("emu_selftest_reverse_segments_f32", x, y, x.numel(), 16384)
        assert torch.equal(y, torch.cat([c.flip(0) for c in x.split(16384)]))
        with pytest.raises(EmuError, match="227 KiB"):
            emu.fn("emu_selftest_set_reverse_f32_max_smem", 300 * 1024)
    finally:
        emu.fn("emu_selftest_set_reverse_f32_max_smem", 48 * 1024)


def test_dynamic_shared_memory_starts_poisoned(emu):
    out = torch.zeros(100, dtype=torch.int32)
    emu.fn("emu_selftest_smem_peek", out, 100)
    assert torch.all(out == -1)  # 0xFFFFFFFF in every word, like NaN for floats


@pytest.mark.parametrize("grid,block", [((2, 1, 1), (64, 1, 1)), ((3, 2, 2), (5, 3, 2)), ((1, 3, 1), (8, 4, 2))])
def test_grid_block_indexing_and_warp_formation(emu, grid, block):
    nb, nt = math.prod(grid), math.prod(block)
    out = torch.full((nb * nt * 10,), -7, dtype=torch.int32)
    emu.fn("emu_selftest_index", out, *grid, *block)
    rows = out.numpy().reshape(nb, nt, 10)
    for b in range(nb):
        bz, by, bx = b // (grid[0] * grid[1]), b // grid[0] % grid[1], b % grid[0]
        for t in range(nt):
            tz, ty, tx = t // (block[0] * block[1]), t // block[0] % block[1], t % block[0]
            lane, lanes_in_warp = t % 32, min(32, nt - 32 * (t // 32))
            down = t + 1 if lane + 1 < lanes_in_warp else (t if lane == 31 else -1)  # -1: poison (no lane)
            assert list(rows[b, t]) == [tx, ty, tz, bx, by, bz, nt, nb, t - lane, down], (b, t)


# ---------------------------------------------------------------------------------------------
# Schedules: order, determinism, barriers, selection.
# ---------------------------------------------------------------------------------------------


def tickets(emu, schedule: str, grid: int = 3, block: int = 64) -> np.ndarray:
    counter = torch.zeros(1, dtype=torch.int32)
    t = torch.full((grid * block * 2,), -1, dtype=torch.int32)
    with emu.schedule(schedule):
        emu.fn("emu_selftest_tickets", counter, t, grid, block)
    return t.numpy().reshape(grid, block, 2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_blocks_run_one_after_another_and_barriers_hold(emu, schedule):
    t = tickets(emu, schedule)
    for b in range(t.shape[0]):
        lo = t[b].min()
        assert sorted(t[b].reshape(-1)) == list(range(lo, lo + t.shape[1] * 2)), "blocks interleaved"
        assert t[b, :, 0].max() < t[b, :, 1].min(), "a thread passed __syncthreads early"


def test_forward_and_reverse_orders(emu):
    block = 64
    fwd = tickets(emu, "forward", block=block)
    rev = tickets(emu, "reverse", block=block)
    ids = np.arange(block)
    for b in range(3):
        assert np.array_equal(fwd[b, :, 0], 2 * block * b + ids)
        assert np.array_equal(fwd[b, :, 1], 2 * block * b + block + ids)
        assert np.array_equal(rev[b, :, 0], 2 * block * (2 - b) + block - 1 - ids)
        assert np.array_equal(rev[b, :, 1], 2 * block * (2 - b) + 2 * block - 1 - ids)


def test_random_schedule_is_seeded_and_reshuffles_at_barriers(emu):
    a, a2, b = tickets(emu, "random:5"), tickets(emu, "random:5"), tickets(emu, "random:6")
    assert np.array_equal(a, a2)
    assert not np.array_equal(a, b)
    assert not np.array_equal(np.argsort(a[0, :, 0]), np.argsort(a[0, :, 1])), "order not redrawn at the barrier"
    assert not np.array_equal(np.argsort(a[0, :, 0]), np.arange(64))


def test_schedule_selection(emu, monkeypatch):
    assert emu.get_schedule() == "random:0"
    monkeypatch.setenv("CUDA_EMU_SCHEDULE", "reverse")
    assert emu.get_schedule() == "reverse"
    rev = tickets(emu, None)
    assert rev[0, 0, 0] == 2 * 64 * 2 + 63  # thread 0 of block 0 runs last
    with emu.schedule("forward"):
        assert emu.get_schedule() == "forward"
        with emu.schedule("random:9"):
            assert emu.get_schedule() == "random:9"
        assert emu.get_schedule() == "forward"
    assert emu.get_schedule() == "reverse"
    with pytest.raises(ValueError, match="not one of forward"):
        emu.set_schedule("sideways")
    monkeypatch.setenv("CUDA_EMU_SCHEDULE", "random:x")
    with pytest.raises(EmuError, match="CUDA_EMU_SCHEDULE") as e:
        tickets(emu, None)
    assert e.value.code == 5


# ---------------------------------------------------------------------------------------------
# Errors the emulator detects, and recovery after them.
# ---------------------------------------------------------------------------------------------

SYNC_BUGS = [
    (0, 2, "divergent barrier"),
    (1, 2, "deadlock"),
    (2, 2, "partial warp masks are not supported"),
    (3, 2, "diverged"),
    (4, 3, "__trap"),
]


@pytest.mark.parametrize("bug,code,message", SYNC_BUGS)
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:3", "parallel"])
def test_synchronisation_bugs_are_reported(emu, bug, code, message, schedule):
    out = torch.zeros(64, dtype=torch.int32)
    with emu.schedule(schedule):
        with pytest.raises(EmuError, match=message) as e:
            emu.fn("emu_selftest_sync_bug", out, bug, 64)
    assert e.value.code == code
    assert "selftest_kernels.cuh:" in str(e.value)  # the message names the source line
    x = torch.randn(600, generator=gen(bug))  # the library recovers: the next launch works
    assert abs(block_sum(emu, x, False) - x.double().sum().item()) <= block_sum_bound(x)


def test_deadlock_message_names_both_sites(emu):
    with pytest.raises(EmuError) as e:
        emu.fn("emu_selftest_sync_bug", torch.zeros(64, dtype=torch.int32), 1, 64)
    msg = str(e.value)
    assert "__syncthreads (" in msg and "__shfl_xor_sync (" in msg and "selftest_kernels.cuh" in msg


@pytest.mark.parametrize(
    "grid,block,message",
    [
        ((1, 1, 1), (64, 32, 1), "has 2048 threads, the limit is 1024"),
        ((1, 1, 1), (2048, 1, 1), "exceeds the per-dimension limits"),
        ((1, 1, 1), (1, 1, 128), "exceeds the per-dimension limits"),
        ((0, 1, 1), (64, 1, 1), r"gridDim \(0,1,1\) has a zero extent"),
        ((1, 70000, 1), (64, 1, 1), "exceeds the limits"),
        ((1, 1, 1), (8, 0, 1), r"blockDim \(8,0,1\) has a zero extent"),
    ],
)
def test_invalid_launch_configuration(emu, grid, block, message):
    out = torch.zeros(10, dtype=torch.int32)  # never written: the launch is refused up front
    with pytest.raises(EmuError, match=message) as e:
        emu.fn("emu_selftest_index", out, *grid, *block)
    assert e.value.code == 1
    assert torch.all(out == 0)


def test_binding_call_checks(emu):
    x = torch.randn(64)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        emu.fn("emu_selftest_block_sum", x, x)
    with pytest.raises(ValueError, match="contiguous"):
        emu.fn("emu_selftest_block_sum", torch.randn(8, 8).t(), x, x, 64, 1, 0)
    with pytest.raises(TypeError, match="scalar"):
        emu.fn("emu_selftest_block_sum", x, x, x, x, 1, 0)
    with pytest.raises(AttributeError, match="no binding"):
        emu.fn("emu_selftest_nonexistent")
    with pytest.raises(EmuError, match="n must be >= 0, got -1") as e:
        emu.fn("emu_selftest_block_sum", x, x, x, -1, 1, 0)
    assert e.value.code == 5
    assert emu.signature("emu_selftest_compact") == "plfppp"


def test_counters_see_every_barrier(emu):
    before = emu.counters()
    block_sum(emu, torch.randn(3 * 256, generator=gen(1)), False, max_partials=3)
    after = emu.counters()
    d = {k: after[k] - before[k] for k in after}
    # 2 launches (3 blocks, then 1), 1 + log2(256) = 9 __syncthreads per block
    assert (d["launches"], d["blocks"], d["thread_runs"], d["block_barriers"]) == (2, 4, 4 * 256, 36)
    assert d["token_passes"] >= 36 * 256


# ---------------------------------------------------------------------------------------------
# __half / __nv_bfloat16: bit-exact conversions and arithmetic.
# ---------------------------------------------------------------------------------------------

ALL16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # every 16-bit pattern
STORAGE = {"f16": (1, torch.float16), "bf16": (2, torch.bfloat16)}


def float_probe_values(dtype16: torch.dtype) -> torch.Tensor:
    """float32 inputs for rounding: every 16-bit value, every midpoint between neighbours (ties) and
    the floats just around them, random bit patterns (all exponents, NaN, inf, subnormals), specials."""
    finite = ALL16.view(dtype16).double()
    finite = finite[torch.isfinite(finite)].unique()  # sorted, -0 merged with +0
    mid = (finite[1:] + finite[:-1]) / 2  # exact in float32 (needs 12 / 9 significant bits)
    m32 = mid.float()
    assert torch.equal(m32.double(), mid)
    up = torch.nextafter(m32, torch.tensor(math.inf))
    down = torch.nextafter(m32, torch.tensor(-math.inf))
    rnd = torch.randint(-(2**31), 2**31 - 1, (1 << 17,), generator=gen(99), dtype=torch.int32).view(torch.float32)
    big = finite.abs().max().item()
    specials = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, big, -big, big * 1.001, 3.4e38, 1e-45, -1e-45, 2.0**-24, 2.0**-25,
         3 * 2.0**-26, 2.0**-133, 2.0**-134, 1.5 * 2.0**-134]
    )
    return torch.cat([finite.float(), m32, up, down, rnd, specials])


@pytest.mark.parametrize("name", list(STORAGE))
def test_16bit_to_float_all_bit_patterns(emu, name):
    code, dtype16 = STORAGE[name]
    out = torch.empty(ALL16.numel())
    emu.fn("emu_selftest_convert", ALL16, out, ALL16.numel(), code, 0)
    ref = ALL16.view(dtype16).float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # bit for bit, incl. -0
    if name == "f16":  # cuda_fp16.h's __half2float returns the canonical NaN
        assert torch.all(out[nan].view(torch.int32) == 0x7FFFFFFF)
    else:  # __bfloat162float is a shift: payload kept, same as torch
        assert torch.equal(out[nan].view(torch.int32), ref[nan].view(torch.int32))


@pytest.mark.parametrize("name", list(STORAGE))
def test_float_to_16bit_rounds_to_nearest_even(emu, name):
    code, dtype16 = STORAGE[name]
    x = float_probe_values(dtype16)
    out = torch.empty(x.numel(), dtype=torch.int16)
    emu.fn("emu_selftest_convert", x, out, x.numel(), 0, code)
    nan = torch.isnan(x)
    ref = x.to(dtype16).view(torch.int16)
    assert torch.equal(out[~nan], ref[~nan])
    assert torch.all(out[nan] == 0x7FFF)  # CUDA's canonical NaN (torch writes 0x7E00 / 0x7FC0)


def decode16(bits: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        if name == "f16":
            return bits.view(np.float16).astype(np.float64)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", list(STORAGE))
def test_double_to_16bit_rounds_directly(emu, name):
    """__double2half/__double2bfloat16 round the double once: values a hair off a midpoint must not
    be rounded to float first (that would make them ties)."""
    kind = 0 if name == "f16" else 1
    dtype16 = STORAGE[name][1]
    finite = ALL16.view(dtype16).double()
    finite = finite[torch.isfinite(finite)].unique().numpy()
    mid = (finite[1:] + finite[:-1]) / 2
    rng = np.random.default_rng(3)
    rnd = rng.integers(-(2**63), 2**63 - 1, 1 << 15, dtype=np.int64).view(np.float64)
    rnd = rnd[np.isfinite(rnd)]
    scaled = rng.standard_normal(1 << 14) * np.exp2(rng.integers(-150, 140, 1 << 14))
    x = np.concatenate([mid, mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), rnd, scaled])
    out = np.empty(x.size, dtype=np.uint16)
    emu.fn("emu_selftest_double_to_16bit", x, out, x.size, kind)
    if name == "f16":  # numpy rounds float64 -> float16 directly
        with np.errstate(over="ignore"):
            assert np.array_equal(out, x.astype(np.float16).view(np.uint16))
    # Nearest, ties to even, checked against both neighbours in exact float64 arithmetic.
    r = decode16(out, name)
    nxt = decode16((out.astype(np.int64) + 1).astype(np.uint16), name)  # sign-magnitude: one ulp outwards
    prv = decode16((out.astype(np.int64) - 1).astype(np.uint16), name)  # one ulp inwards (not from a zero)
    fin = np.isfinite(r)
    with np.errstate(invalid="ignore", over="ignore"):
        d, dn, dp = np.abs(x - r), np.abs(x - nxt), np.abs(x - prv)
    dn[~np.isfinite(nxt)] = np.inf  # next is inf/NaN: only the previous neighbour competes
    dp[(out & 0x7FFF) == 0] = np.inf
    assert np.all(d[fin] <= dn[fin]) and np.all(d[fin] <= dp[fin])
    tie = fin & ((d == dn) | (d == dp))
    assert np.all(out[tie] & 1 == 0)
    top = finite.max()
    assert np.all(~fin == (np.abs(x) >= top + (top - finite[-2]) / 2))  # overflow exactly at max + ulp/2


@pytest.mark.parametrize("name", list(STORAGE))
def test_16bit_arithmetic_intrinsics(emu, name):
    code, dtype16 = STORAGE[name]
    n = 20000
    g = gen(code)
    a = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    b = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    b[:1000] = a[:1000]  # equal operands (comparisons, max/min ties)
    b[1000:1100] = a[1000:1100] ^ -(2**15)  # opposite signs, e.g. +0 / -0
    fa, fb = a.view(dtype16), b.view(dtype16)
    out = torch.empty(n, dtype=torch.int16)
    cmp = torch.empty(n, dtype=torch.int32)
    # torch computes 16-bit + - * in float32 and rounds once: exact to the last bit (24 >= 2p+2).
    for op, ref in [(0, fa + fb), (1, fa - fb), (2, fa * fb)]:
        emu.fn("emu_selftest_arith16", a, b, out, cmp, n, op, code)
        nan = torch.isnan(ref)
        assert torch.equal(out[~nan], ref.view(torch.int16)[~nan])
        assert torch.all(out[nan] == 0x7FFF)
    xa, xb = fa.double().numpy(), fb.double().numpy()
    for op, pick in [(3, np.fmax), (4, np.fmin)]:
        emu.fn("emu_selftest_arith16", a, b, out, cmp, n, op, code)
        r = out.numpy()
        got = decode16(r.view(np.uint16), name)
        both_nan = np.isnan(xa) & np.isnan(xb)
        assert np.all(r[both_nan] == 0x7FFF)
        ok = ~both_nan
        assert np.array_equal(got[ok], pick(xa, xb)[ok])
        zeros = ok & (xa == 0) & (xb == 0)  # +0 > -0 for max, -0 < +0 for min
        neg = np.signbit(xa) & np.signbit(xb) if op == 3 else np.signbit(xa) | np.signbit(xb)
        assert np.array_equal(np.signbit(got[zeros]), neg[zeros])
    # eq, ne, lt, le, gt, ge, all ordered (false when either is NaN; numpy's != is unordered)
    bits = [xa == xb, (xa < xb) | (xa > xb), xa < xb, xa <= xb, xa > xb, xa >= xb]
    ref_cmp = sum(b.astype(np.int32) << k for k, b in enumerate(bits))
    assert np.array_equal(cmp.numpy(), ref_cmp)


# ---------------------------------------------------------------------------------------------
# Cross-checks against the CUDA toolkit: its own conversions, and nvcc on the self-test kernels.
# ---------------------------------------------------------------------------------------------


def cuda_home() -> Path | None:
    """The CUDA toolkit with its headers: $CUDA_HOME, $CUDA_PATH, nvcc's install, /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        cands.insert(2, str(Path(nvcc).resolve().parent.parent))
    for cand in cands:
        if cand and (Path(cand) / "include" / "cuda_fp16.h").is_file():
            return Path(cand)
    return None


def test_conversions_match_cuda_headers_bit_for_bit(emu):
    import ctypes

    home = cuda_home()
    if home is None:
        pytest.skip("CUDA toolkit headers (cuda_fp16.h) not found: set CUDA_HOME or put nvcc on PATH")
    lib = ctypes.CDLL(str(build(["cuda_ref_conversions.cpp"], emu=False, include_dirs=[home / "include"])))
    for fn in (lib.ref_16bit_to_float, lib.ref_float_to_16bit, lib.ref_double_to_16bit):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    for name, (code, dtype16) in STORAGE.items():
        kind = code - 1
        got, ref = torch.empty(65536), torch.empty(65536)
        emu.fn("emu_selftest_convert", ALL16, got, 65536, code, 0)
        lib.ref_16bit_to_float(ALL16.data_ptr(), ref.data_ptr(), 65536, kind)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), name
        x = float_probe_values(dtype16)
        got16, ref16 = torch.empty(x.numel(), dtype=torch.int16), torch.empty(x.numel(), dtype=torch.int16)
        emu.fn("emu_selftest_convert", x, got16, x.numel(), 0, code)
        lib.ref_float_to_16bit(x.data_ptr(), ref16.data_ptr(), x.numel(), kind)
        assert torch.equal(got16, ref16), name
        xd = torch.cat([x.double(), x.double() * (1 + 2.0**-40), torch.randn(4096, dtype=torch.float64) * 1e3])
        got16 = torch.empty(xd.numel(), dtype=torch.int16)
        ref16 = torch.empty(xd.numel(), dtype=torch.int16)
        emu.fn("emu_selftest_double_to_16bit", xd, got16, xd.numel(), kind)
        lib.ref_double_to_16bit(xd.data_ptr(), ref16.data_ptr(), xd.numel(), kind)
        assert torch.equal(got16, ref16), name


def test_selftest_kernels_compile_with_nvcc():
    """selftest_kernels.cuh is real CUDA: nvcc compiles its launchers for sm_80 and sm_90 with the
    flags PyTorch's extension builds use. Cached by content hash (a stamp), like the emulator build."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA self-test kernels are only checked by the emulator")
    src = EMU_DIR / "selftest_kernels.cu"
    cmd = [nvcc, "-std=c++17", "-c", str(src), f"-I{CSRC_DIR}", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", *TORCH_NVCC_DEFINES, "--expt-relaxed-constexpr"]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(("\0".join(cmd) + version).encode())
    # The kernels include csrc headers of both kinds (common/*.h, cuda/acc_types.cuh).
    for p in [src, EMU_DIR / "selftest_kernels.cuh", *sorted(CSRC_DIR.rglob("*.h")), *sorted(CSRC_DIR.rglob("*.cuh"))]:
        h.update(p.read_bytes())
    stamp = cache_dir() / f"nvcc-selftest-{h.hexdigest()[:20]}.ok"
    if stamp.exists():
        return
    out = cache_dir() / f"nvcc-selftest-{os.getpid()}.o"
    try:
        proc = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    finally:
        out.unlink(missing_ok=True)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(cmd) + "\n")


def test_header_compiles_with_implicit_half_conversions(tmp_path):
    """Without PyTorch's __CUDA_NO_HALF_* defines the 16-bit types gain CUDA's implicit conversions
    and operators; the header and the self-test kernels must compile in that configuration too."""
    src = tmp_path / "implicit_half_check.cpp"
    src.write_text(
        '#include "cuda_emu.h"\n#include "selftest_kernels.cuh"\n'
        "float f(__half a, __nv_bfloat16 b) {\n"
        "  __half c = a + __half(1.5f); c += a; __nv_bfloat16 d = b * __nv_bfloat16(2.0);\n"
        "  __half e = 3; bool lt = c < a; return float(c) + float(d) + float(e) + lt + float(__half(int64_t(7)));\n}\n"
    )
    undef = [f"-U{d[2:]}" for d in TORCH_NVCC_DEFINES]
    cmd = compile_command([src], Path(os.devnull), extra_flags=[*undef, "-fsyntax-only"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_thread_sanitizer_reports_the_missing_barrier():
    """The parallel schedule under ThreadSanitizer: the engine's own locking is hidden from TSan and
    only CUDA's edges are declared, so a missing __syncthreads is a reported race in every run and
    the correct kernel is clean."""
    try:
        exe = build(["tsan_main.cpp"], name="tsan_selftest", shared=False, extra_flags=["-fsanitize=thread"])
    except CompilerNotFound as e:
        pytest.skip(str(e))
    except RuntimeError as e:
        if "tsan" in str(e).lower():
            pytest.skip(f"no ThreadSanitizer runtime: {str(e)[-300:]}")
        raise

    def run(arg):
        proc = subprocess.run([str(exe), arg], capture_output=True, text=True, timeout=120)
        if "FATAL: ThreadSanitizer" in proc.stderr and shutil.which("setarch"):  # high mmap ASLR entropy
            proc = subprocess.run(["setarch", platform.machine(), "-R", str(exe), arg], capture_output=True,
                                  text=True, timeout=120)
        if "FATAL: ThreadSanitizer" in proc.stderr:
            pytest.skip(f"ThreadSanitizer cannot run here: {proc.stderr.strip()[:300]}")
        return proc

    ok = run("correct")
    assert ok.returncode == 0 and "ThreadSanitizer" not in ok.stderr, ok.stderr[:3000]
    assert "out=-5 expected=-5" in ok.stdout
    bad = run("missing_sync")
    assert "WARNING: ThreadSanitizer: data race" in bad.stderr
    assert "block_sum_kernel<true>" in bad.stderr
