"""The causal_block_mask CUDA kernels (csrc/cuda/block_mask.cuh), run on the CPU by the CUDA
emulator (tests/cuda_emu, binding emu_block_mask.cpp), against the CPU kernel and the PyTorch
reference, bit for bit: the mask, and the masked output in every dtype the launcher takes, with
rows and addresses that make the write kernel run each of its vector widths (16, 8, 4, 2, 1
bytes). Each case runs under the forward, reverse and random:1 schedules. Outputs live in buffers
with guard bytes on both sides and are pre-filled with a sentinel, so a write out of bounds or a
mask byte the scan never writes shows up. The last tests show that the comparison catches wrong
launches and that a different seed gives a different emulated mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import load_emulated

import streamssl.ops as ops
from streamssl.ops import reference

try:
    from cuda_emu import EmuError
except ImportError:  # tests/ imported as a package
    from tests.cuda_emu import EmuError

# streamssl::cuda::Dtype (csrc/cuda/block_mask_launch.h): the launcher's dtypes.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DTYPES = tuple(DTYPE_CODE)
SCHEDULES = ("forward", "reverse", "random:1")
DEFAULTS = dict(mask_prob=0.01, block_size=40, min_start=16, left_context=-1, max_mask_ratio=0.8, align=1)
GUARD = 64  # bytes before and after every buffer the kernels see; CPU tensors are 64-byte aligned
SENTINEL = 0xA5  # not a bool (0/1): a mask byte left unwritten cannot pass for one
CONFIG_FIELDS = ("scan_grid", "scan_block", "write_grid", "write_block", "smem_bytes", "vec_bytes",
                 "vecs_per_row", "n_vecs", "index32", "elem_size")


@pytest.fixture(scope="module")
def emu():
    return load_emulated("emu_block_mask.cpp")


pytestmark = pytest.mark.usefixtures("emu_default_schedule")


def _cpu_kernel_available() -> bool:
    return ops.backend() != "reference"


# --------------------------------------------------------------------------------------------
# Running the emulated kernels on guarded, optionally misaligned buffers
# --------------------------------------------------------------------------------------------

def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class Guarded:
    """`nbytes` bytes at `GUARD + offset` of a sentinel-filled uint8 buffer: `addr % 16` is
    `offset % 16`, and the bytes around the payload must survive every launch. The payload holds
    a copy of `payload`'s bytes, or `fill` bytes."""

    def __init__(self, nbytes: int, offset: int = 0, payload: torch.Tensor | None = None, fill: int = SENTINEL):
        self.nbytes, self.start = nbytes, GUARD + offset
        self.buf = torch.full((self.start + nbytes + GUARD,), SENTINEL, dtype=torch.uint8)
        self.buf[self.start : self.start + nbytes] = as_bytes(payload) if payload is not None else fill
        self.addr = self.buf.data_ptr() + self.start
        assert self.addr % 16 == offset % 16
        self.before = self.buf.clone()

    def payload(self) -> torch.Tensor:
        return self.buf[self.start : self.start + self.nbytes].clone()

    def guards_intact(self) -> bool:
        b, s, e = self.buf, self.start, self.start + self.nbytes
        return torch.equal(b[:s], self.before[:s]) and torch.equal(b[e:], self.before[e:])

    def unchanged(self) -> bool:
        return torch.equal(self.buf, self.before)


@dataclass
class EmuRun:
    B: int
    T: int
    masked: torch.Tensor  # the output's bytes, flat uint8
    mask: torch.Tensor  # the mask's bytes, flat uint8 (0/1 if the scan wrote them all)
    config: dict  # block_mask_launch_config for the addresses used
    problems: list  # guard or input damage, found while running


def emulate(emu, feats, lengths, emb, seed, offset, params, *, binding="emu_causal_block_mask", extra=(),
            feats_offset=0, emb_offset=0, out_offset=0, mask_fill=SENTINEL) -> EmuRun:
    """The emulated CUDA op on copies of feats / emb placed `*_offset` bytes past 16-byte
    alignment, writing into a sentinel-filled output at `out_offset`."""
    B, T, F = feats.shape
    x = Guarded(feats.numel() * feats.element_size(), feats_offset, feats)
    e = Guarded(emb.numel() * emb.element_size(), emb_offset, emb)
    out = Guarded(x.nbytes, out_offset)
    mask = Guarded(B * T, fill=mask_fill)
    lengths = lengths.clone()
    lengths_before = lengths.clone()
    p = {**DEFAULTS, **params}
    code = DTYPE_CODE[feats.dtype]
    cfg = torch.zeros(len(CONFIG_FIELDS), dtype=torch.int64)
    emu.fn("emu_block_mask_launch_config", x.addr, e.addr, out.addr, B, T, F, code, cfg)
    config = dict(zip(CONFIG_FIELDS, cfg.tolist()))
    # The widest of 16, 8, 4, 2, 1 bytes that divides the row and all three addresses. Checked
    # before launching: the emulator does not report a misaligned vector access as a GPU would,
    # and on the CPU one may well crash the process instead.
    fits = [v for v in (16, 8, 4, 2, 1) if all(a % v == 0 for a in (x.addr, e.addr, out.addr, F * feats.element_size()))]
    assert config["vec_bytes"] == fits[0], f"write kernel vector width {config['vec_bytes']}, the data allow {fits[0]}"
    emu.fn(binding, x.addr, lengths, e.addr, out.addr, mask.addr, B, T, F, code, seed, offset, p["mask_prob"],
           p["block_size"], p["min_start"], p["left_context"], p["max_mask_ratio"], p["align"], *extra)
    problems = []
    if not (x.unchanged() and e.unchanged() and torch.equal(lengths, lengths_before)):
        problems.append("an input changed")
    if not (out.guards_intact() and mask.guards_intact()):
        problems.append("a write landed outside masked or mask")
    return EmuRun(B, T, out.payload(), mask.payload(), config, problems)


def differences(run: EmuRun, want_mask: torch.Tensor, want_masked: torch.Tensor) -> list[str]:
    """What is wrong with an emulated run against the expected (B, T) mask and masked output."""
    problems = list(run.problems)
    unwritten = ~((run.mask == 0) | (run.mask == 1))
    if unwritten.any():
        rows = sorted({i // run.T for i in unwritten.nonzero().flatten().tolist()})
        problems.append(f"mask bytes never written in utterances {rows}")
    elif not torch.equal(run.mask.view(torch.bool).view(run.B, run.T), want_mask):
        rows = (run.mask.view(torch.bool).view(run.B, run.T) != want_mask).any(dim=1).nonzero().flatten().tolist()
        problems.append(f"mask differs in utterances {rows}")
    diff = run.masked != as_bytes(want_masked)
    if diff.any():
        problems.append(f"masked differs in {int(diff.sum())} of {diff.numel()} bytes, "
                        f"first at byte {int(diff.nonzero()[0])}")
    return problems


def make_inputs(B, T, F, dtype, lengths, seed):
    """feats and emb of random bytes: every bit pattern (NaN payloads, -0, subnormals) must be
    copied as it is."""
    g = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    feats = torch.randint(0, 256, (B * T * F * size,), dtype=torch.uint8, generator=g).view(dtype).view(B, T, F)
    emb = torch.randint(0, 256, (F * size,), dtype=torch.uint8, generator=g).view(dtype)
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    return feats, torch.tensor(lengths, dtype=torch.int64).view(B), emb


def expected(feats, lengths, emb, seed, offset, params):
    """(mask, masked) of the reference, and of the CPU kernel where the extension is built. The CPU
    kernel refuses negative lengths, which the CUDA path counts as 0: it gets them clamped."""
    p = {**DEFAULTS, **params}
    ref_masked, ref_mask = reference.causal_block_mask(feats, lengths, emb, seed, offset, **p)
    out = [("reference", ref_mask, ref_masked)]
    if _cpu_kernel_available():
        cpu_masked, cpu_mask = torch.ops.streamssl.causal_block_mask(
            feats, lengths.clamp(min=0), emb, seed, offset, *p.values())
        out.append(("cpu kernel", cpu_mask, cpu_masked))
    return out


def check(emu, feats, lengths, emb, seed, offset, params, schedules=SCHEDULES, **kw) -> EmuRun:
    """Emulated == reference == CPU kernel, bit for bit, under every schedule; returns the last run."""
    wants = expected(feats, lengths, emb, seed, offset, params)
    for schedule in schedules:
        with emu.schedule(schedule):
            run = emulate(emu, feats, lengths, emb, seed, offset, params, **kw)
        for name, want_mask, want_masked in wants:
            problems = differences(run, want_mask, want_masked)
            assert not problems, f"{schedule} vs {name}: {problems} ({feats.dtype}, {tuple(feats.shape)}, {params})"
    return run


# --------------------------------------------------------------------------------------------
# Emulated CUDA == CPU kernel == reference
# --------------------------------------------------------------------------------------------

# (name, B, T, F, lengths or None for random ones, parameter overrides, whether some frame ends up
# masked). Shapes are small because every emulated CUDA thread is a fiber; each case still has
# candidates that draw and blocks that pass (or, where the last field says so, none can).
CASES = [
    ("T=1", 3, 1, 4, [1, 0, 5], dict(min_start=0, mask_prob=1.0, max_mask_ratio=1.0), True),
    ("T<block", 4, 25, 3, [25, 25, 20, 7], dict(min_start=2, mask_prob=0.2), True),
    ("T%align", 4, 37, 3, [37, 36, 30, 50], dict(align=4, min_start=3, mask_prob=0.2, block_size=7), True),
    ("B=1", 1, 300, 5, [300], dict(mask_prob=0.05), True),
    # 9 utterances: three scan blocks of 4 warps, the last with one live warp and three that return.
    ("B=9", 9, 60, 2, None, dict(mask_prob=0.1, block_size=9, min_start=4), True),
    ("F=1", 5, 200, 1, None, dict(mask_prob=0.03, block_size=11), True),
    ("F=80", 3, 100, 80, [100, 77, 100], dict(mask_prob=0.05, block_size=10), True),
    ("F=0", 3, 50, 0, [50, 20, 3], dict(mask_prob=0.5, block_size=5, min_start=0, max_mask_ratio=1.0), True),
    ("left_context", 4, 300, 3, [300, 300, 280, 100],
     dict(mask_prob=0.08, block_size=10, left_context=30, max_mask_ratio=0.5), True),
    ("left_context=0", 4, 300, 3, [300, 300, 280, 100],
     dict(mask_prob=0.08, block_size=10, left_context=0, max_mask_ratio=0.5), True),
    ("align=3", 4, 200, 3, None, dict(mask_prob=0.1, align=3, min_start=5, block_size=6), True),
    ("mask_prob=0", 3, 100, 3, [100, 100, 60], dict(mask_prob=0.0, min_start=0, max_mask_ratio=1.0), False),
    ("mask_prob=1", 3, 120, 3, [120, 77, 5], dict(mask_prob=1.0, block_size=13, min_start=3), True),
    ("mask_prob=1,left", 3, 120, 3, [120, 77, 5],
     dict(mask_prob=1.0, block_size=13, left_context=20, max_mask_ratio=0.6), True),
    ("ratio=0", 3, 200, 3, [200, 200, 150], dict(mask_prob=0.3, max_mask_ratio=0.0), False),
    ("ratio=1", 3, 200, 3, None, dict(mask_prob=0.1, max_mask_ratio=1.0, left_context=15), True),
    ("lengths=0", 3, 50, 3, [0, 0, 0], dict(mask_prob=1.0, min_start=0, max_mask_ratio=1.0), False),
    ("lengths>T", 3, 50, 3, [51, 1000, 2**40], dict(mask_prob=0.1, min_start=0, block_size=5), True),
    # The CUDA path counts negative lengths as 0 (no host sync to check them): only utterance 1 masks.
    ("lengths<0", 4, 50, 3, [-1, 50, -2**40, -50], dict(mask_prob=1.0, min_start=0, block_size=5, max_mask_ratio=1.0), True),
    ("block_size=1", 3, 90, 3, None, dict(mask_prob=0.3, block_size=1, min_start=0, max_mask_ratio=0.25), True),
    # More than 128 candidates: the scan's draw loop takes several steps of 4 ballots.
    ("long", 2, 700, 2, [700, 650], dict(mask_prob=0.02, left_context=300), True),
    # Parameters far beyond T: make_block_mask_rule clamps them to 2^31.
    ("huge_block", 2, 80, 3, [80, 60], dict(mask_prob=0.05, block_size=2**40, min_start=1, max_mask_ratio=1.0), True),
    ("huge_align", 2, 80, 3, [80, 2], dict(mask_prob=1.0, align=2**40, min_start=0, block_size=3, max_mask_ratio=1.0), True),
    ("huge_min_start", 2, 80, 3, [80, 80], dict(mask_prob=1.0, min_start=2**40), False),
    ("huge_left_context", 2, 80, 3, [80, 80], dict(mask_prob=0.2, left_context=2**50, block_size=4), True),
    ("B=0", 0, 10, 3, [], dict(mask_prob=1.0), False),
    ("T=0", 2, 0, 3, [5, 0], dict(mask_prob=1.0), False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_kernels_match_cpu_kernel_and_reference(emu, case):
    _, B, T, F, lengths, params, masks = case
    for i, dtype in enumerate(DTYPES):
        seed = (0x9E3779B97F4A7C15 * (i + 1)) % 2**64 - 2**63  # negative seeds too
        offset = i * 2**31 + 5  # offsets past 2^32 enter the counter mod 2^32
        feats, lengths_t, emb = make_inputs(B, T, F, dtype, lengths, seed=i)
        run = check(emu, feats, lengths_t, emb, seed, offset, params)
        assert bool(run.mask.any()) == masks, "the case no longer tests what its name says"
        if B * T:  # one warp per utterance; the write kernel covers every vector of the output
            cfg = run.config
            assert cfg["scan_grid"] * cfg["scan_block"] // 32 >= B > (cfg["scan_grid"] - 1) * cfg["scan_block"] // 32
            assert cfg["n_vecs"] * cfg["vec_bytes"] == B * T * F * feats.element_size()


# (dtype, F, which pointer is moved, by how many bytes, the vector width that forces): every width
# of the write kernel, each of feats / emb / out misaligned at least once.
WIDTHS = [
    (torch.float32, 80, None, 0, 16),
    (torch.bfloat16, 8, None, 0, 16),
    (torch.float32, 2, None, 0, 8),  # 8-byte rows
    (torch.float64, 3, None, 0, 8),  # 24-byte rows
    (torch.float64, 80, "out", 8, 8),
    (torch.float32, 3, None, 0, 4),  # 12-byte rows
    (torch.float32, 80, "emb", 4, 4),
    (torch.float16, 3, None, 0, 2),  # 6-byte rows
    (torch.float16, 80, "out", 2, 2),
    (torch.float32, 80, "feats", 2, 2),  # floats at addresses that are not multiples of 4
    (torch.float16, 80, "feats", 1, 1),
    (torch.bfloat16, 5, "emb", 1, 1),
    (torch.float64, 1, "out", 3, 1),
]


@pytest.mark.parametrize("dtype,F,moved,by,width", WIDTHS,
                         ids=[f"{str(d)[6:]}-F{F}-{m or 'aligned'}{by or ''}-v{w}" for d, F, m, by, w in WIDTHS])
def test_every_vector_width_of_the_write_kernel(emu, dtype, F, moved, by, width):
    B, T = 3, 40
    feats, lengths, emb = make_inputs(B, T, F, dtype, [40, 33, 12], seed=F)
    params = dict(mask_prob=0.2, block_size=5, min_start=2, max_mask_ratio=0.7)
    offsets = {f"{moved}_offset": by} if moved else {}
    run = check(emu, feats, lengths, emb, 11, 3, params, **offsets)
    assert run.config["vec_bytes"] == width
    assert run.mask.any()


@pytest.mark.parametrize("write_blocks,index64", [(1, False), (3, True), (1, True)])
@pytest.mark.parametrize("dtype,out_offset", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float64, 1)])
def test_grid_stride_and_64_bit_indices(emu, write_blocks, index64, dtype, out_offset):
    """The write kernel's grid-stride loop and its uint64 instantiation, which the launch
    configuration picks only for outputs beyond 2M vectors (8192 blocks) or 2^32 vectors."""
    B, T, F = 4, 80, 40
    feats, lengths, emb = make_inputs(B, T, F, dtype, [80, 79, 31, 0], seed=write_blocks)
    params = dict(mask_prob=0.1, block_size=6, min_start=1, left_context=25, max_mask_ratio=0.6)
    run = check(emu, feats, lengths, emb, -7, 1, params, binding="emu_causal_block_mask_forced",
                extra=(write_blocks, index64), out_offset=out_offset)
    assert run.config["n_vecs"] > 2 * write_blocks * run.config["write_block"]  # every thread strides
    assert run.mask.any()


# --------------------------------------------------------------------------------------------
# The comparison can fail
# --------------------------------------------------------------------------------------------

def test_a_different_seed_or_offset_gives_a_different_emulated_mask(emu):
    """Equality with the CPU kernel is not vacuous: the emulated mask follows the seed and the
    offset, and still matches the CPU kernel for each."""
    B, T, F = 4, 200, 3
    feats, lengths, emb = make_inputs(B, T, F, torch.float32, [200, 180, 150, 200], seed=0)
    params = dict(mask_prob=0.05, block_size=10)
    masks = {}
    for seed, offset in ((1, 0), (2, 0), (1, 1), (1 + 2**32, 0)):
        run = check(emu, feats, lengths, emb, seed, offset, params, schedules=("random:1",))
        masks[(seed, offset)] = run.mask
    assert len({m.numpy().tobytes() for m in masks.values()}) == 4
    assert all(m.any() for m in masks.values())


@pytest.mark.parametrize("mutant,mask_fill,finding", [
    (1, 0, "masked differs"),  # the write ran first and read an all-false mask
    (2, SENTINEL, "mask bytes never written in utterances [2, 3, 6, 7]"),  # half the scan warps
])
def test_wrong_launches_are_caught(emu, mutant, mask_fill, finding):
    B, T, F = 8, 50, 4
    feats, lengths, emb = make_inputs(B, T, F, torch.float32, [50] * B, seed=mutant)
    params = dict(mask_prob=0.2, block_size=5, min_start=0)
    wants = expected(feats, lengths, emb, 4, 0, params)
    for name, want_mask, want_masked in wants:
        assert want_mask.all(dim=1).logical_not().all() and want_mask.any(dim=1).all()
        # The correct launch on the same buffers passes ...
        good = emulate(emu, feats, lengths, emb, 4, 0, params, mask_fill=mask_fill)
        assert differences(good, want_mask, want_masked) == [], name
        # ... the wrong one does not.
        bad = emulate(emu, feats, lengths, emb, 4, 0, params, binding="emu_causal_block_mask_mutant",
                      extra=(mutant,), mask_fill=mask_fill)
        found = differences(bad, want_mask, want_masked)
        assert any(f.startswith(finding) for f in found), (name, found)


def test_binding_rejects_bad_arguments(emu):
    feats, lengths, emb = make_inputs(2, 10, 3, torch.float32, [10, 10], seed=0)
    for bad, message in ((dict(align=0), "align must be >= 1"), (dict(block_size=0), "block_size must be >= 1"),
                         (dict(mask_prob=1.5), "mask_prob must be in [0, 1]"),
                         (dict(max_mask_ratio=-0.1), "max_mask_ratio must be in [0, 1]"),
                         (dict(min_start=-1), "min_start must be >= 0")):
        with pytest.raises(EmuError, match=message.replace("[", r"\[").replace("]", r"\]")):
            emulate(emu, feats, lengths, emb, 0, 0, bad)
    out = torch.empty_like(feats)
    mask = torch.empty(2, 10, dtype=torch.bool)
    with pytest.raises(EmuError, match="dtype must be a Dtype code"):
        emu.fn("emu_causal_block_mask", feats, lengths, emb, out, mask, 2, 10, 3, 7, 0, 0, *DEFAULTS.values())
