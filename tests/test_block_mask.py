"""causal_block_mask: reference == CPU kernel bit for bit, the rule's properties, op registration,
gradients, bad inputs, and CUDA == CPU where a GPU exists (docs/ARCHITECTURE.md, "The fused ops")."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import streamssl.ops as ops
from streamssl.ops import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
             torch.float16: torch.int16, torch.bfloat16: torch.int16}
DEFAULTS = dict(mask_prob=0.01, block_size=40, min_start=16, left_context=-1, max_mask_ratio=0.8, align=1)
PARAM_NAMES = tuple(DEFAULTS)


def _has_kernels() -> bool:
    return ops.backend() != "reference"


needs_kernels = pytest.mark.skipif(not _has_kernels(), reason="the C++ extension is not built (reference backend)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def kernel(feats, lengths, emb, seed, offset=0, **kw):
    """The registered op (CPU or CUDA kernel by device), with the public defaults."""
    p = {**DEFAULTS, **kw}
    return torch.ops.streamssl.causal_block_mask(
        feats, lengths, emb, seed, offset, p["mask_prob"], p["block_size"], p["min_start"],
        p["left_context"], p["max_mask_ratio"], p["align"])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype in _INT_VIEW:
        a, b = a.contiguous().view(_INT_VIEW[a.dtype]), b.contiguous().view(_INT_VIEW[b.dtype])
    assert torch.equal(a.cpu(), b.cpu())


def make_inputs(B, T, F, dtype=torch.float32, lengths=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, F, generator=g).to(dtype)
    # Special values must be copied bit for bit too.
    flat = feats.view(-1)
    for i, v in zip(torch.randint(0, flat.numel(), (3,), generator=g).tolist(), (float("nan"), -0.0, float("inf"))):
        flat[i] = v
    emb = torch.randn(F, generator=g).to(dtype)
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
    return feats.to(device), torch.as_tensor(lengths, dtype=torch.int64).to(device), emb.to(device)


# --------------------------------------------------------------------------------------------
# Philox: the known-answer vectors of Random123 (kat_vectors, philox4x32_10)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_known_answers(ctr, key, expected):
    assert tuple(int(w) for w in reference.philox4x32_10(ctr, key)) == expected


# --------------------------------------------------------------------------------------------
# reference == CPU kernel, bit for bit
# --------------------------------------------------------------------------------------------

# (name, B, T, F, lengths or None, parameter overrides): the shapes and parameter values the
# issue lists, each next to values that make it bite (blocks that fit, candidates that exist).
EDGE_CASES = [
    ("T=1", 3, 1, 4, [1, 0, 5], dict(min_start=0, mask_prob=0.5)),
    ("T<block", 4, 25, 3, None, dict(min_start=2, mask_prob=0.1)),
    ("T%align", 4, 37, 3, [37, 36, 30, 50], dict(align=4, min_start=3, mask_prob=0.1, block_size=7)),
    ("B=1", 1, 300, 5, None, dict(mask_prob=0.05)),
    ("B=65", 65, 60, 2, None, dict(mask_prob=0.05, block_size=9, min_start=4)),
    ("F=1", 5, 200, 1, None, dict(mask_prob=0.03, block_size=11)),
    ("F=80", 3, 250, 80, None, dict(mask_prob=0.02)),
    ("left_context", 4, 300, 3, [300, 300, 280, 100], dict(mask_prob=0.08, block_size=10, left_context=30, max_mask_ratio=0.5)),
    ("no_left_context", 4, 300, 3, [300, 300, 280, 100], dict(mask_prob=0.08, block_size=10, max_mask_ratio=0.5)),
    ("align=3", 4, 200, 3, None, dict(mask_prob=0.1, align=3, min_start=5, block_size=6)),
    ("mask_prob=0", 3, 100, 3, None, dict(mask_prob=0.0)),
    ("mask_prob=1", 3, 120, 3, [120, 77, 5], dict(mask_prob=1.0, block_size=13, min_start=3)),
    ("mask_prob=1,left", 3, 120, 3, [120, 77, 5], dict(mask_prob=1.0, block_size=13, left_context=20, max_mask_ratio=0.6)),
    ("ratio=0", 3, 200, 3, None, dict(mask_prob=0.1, max_mask_ratio=0.0)),
    ("ratio=1", 3, 200, 3, None, dict(mask_prob=0.1, max_mask_ratio=1.0, left_context=15)),
    ("lengths=0", 3, 50, 3, [0, 0, 0], dict(mask_prob=0.5, min_start=0)),
    ("lengths>T", 3, 50, 3, [51, 1000, 2**40], dict(mask_prob=0.1, min_start=0, block_size=5)),
    ("block_size=1", 3, 90, 3, None, dict(mask_prob=0.3, block_size=1, min_start=0, max_mask_ratio=0.25)),
    # Parameters far beyond T: the kernels clamp them to 2^31 and must agree with the reference.
    ("huge_block", 2, 80, 3, None, dict(mask_prob=0.05, block_size=2**40, min_start=1, max_mask_ratio=1.0)),
    ("huge_align", 2, 80, 3, None, dict(mask_prob=1.0, align=2**40, min_start=0, block_size=3)),
    ("huge_min_start", 2, 80, 3, None, dict(mask_prob=1.0, min_start=2**40)),
    ("huge_left_context", 2, 80, 3, None, dict(mask_prob=0.2, left_context=2**50, block_size=4)),
    ("defaults_16s", 2, 1600, 2, [1600, 1234], {}),
]


def _check_against_reference(B, T, F, lengths, params, dtype, seed, offset, input_seed):
    feats, lengths_t, emb = make_inputs(B, T, F, dtype, lengths, seed=input_seed)
    feats_before, emb_before = feats.clone(), emb.clone()
    got_masked, got_mask = kernel(feats, lengths_t, emb, seed, offset, **params)
    ref_masked, ref_mask = reference.causal_block_mask(feats, lengths_t, emb, seed, offset, **{**DEFAULTS, **params})
    assert got_mask.dtype == torch.bool and got_mask.shape == (B, T)
    assert torch.equal(got_mask, ref_mask), f"mask differs: B={B} T={T} seed={seed} offset={offset} {params}"
    assert_bits_equal(got_masked, ref_masked)
    assert_bits_equal(feats, feats_before)  # inputs untouched
    assert_bits_equal(emb, emb_before)
    return got_mask


@needs_kernels
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_cpu_kernel_matches_reference_edge_cases(case):
    _, B, T, F, lengths, params = case
    for i, dtype in enumerate(DTYPES):
        seed = (0x9E3779B97F4A7C15 * (i + 1)) % 2**64 - 2**63  # negative seeds too
        _check_against_reference(B, T, F, lengths, params, dtype, seed, offset=i * 2**31 + 5, input_seed=i)


@pytest.fixture
def one_thread():
    """One intra-op thread: the CPU kernel then fuses scan and write for B >= 4 (it does so for
    B >= 4 * threads), so B in {1, 2, 3} and B in {7, 65} cover both of its code paths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_kernels
def test_cpu_kernel_matches_reference_random(one_thread):
    """80 random draws of shape, dtype, lengths, seed, offset and every parameter."""
    rng = random.Random(2024)
    masked_any = 0
    for trial in range(80):
        B, T, F = rng.choice([1, 2, 3, 7, 65]), rng.randint(1, 260), rng.choice([1, 2, 3, 8, 80])
        if B == 65:  # keeps the reference's per-candidate Python loop (and the test) fast
            T = min(T, 40)
        lengths = [rng.choice([0, T, T + 3, rng.randint(0, T)]) for _ in range(B)]
        params = dict(
            mask_prob=rng.choice([0.0, 1.0, rng.random() * 0.3, rng.random() * 0.3, rng.random()]),
            block_size=rng.choice([1, 2, rng.randint(1, 60)]),
            min_start=rng.choice([0, rng.randint(0, 30)]),
            left_context=rng.choice([-1, 0, rng.randint(1, 80)]),
            max_mask_ratio=rng.choice([0.0, 1.0, rng.random(), rng.random()]),
            align=rng.choice([1, 1, rng.randint(2, 9)]),
        )
        seed, offset = rng.getrandbits(64) - 2**63, rng.getrandbits(40)
        mask = _check_against_reference(B, T, F, lengths, params, rng.choice(DTYPES), seed, offset, trial)
        masked_any += bool(mask.any())
    # About a third of the draws mask nothing by construction (mask_prob or max_mask_ratio 0,
    # a small ratio against short blocks, L <= min_start); most others must produce masks, or
    # the comparison proves little.
    assert masked_any >= 30


_LARGE_OUTPUT_CHECK = """
import torch, streamssl.ops as ops
from streamssl.ops import reference
assert ops.backend() != "reference"
torch.set_num_threads(1)  # B = 6 fuses scan and write per utterance, B = 2 runs them in turn
T = 900
for B, F, dtype in ((6, 80, torch.float32), (2, 80, torch.float32), (6, 81, torch.float32),
                    (2, 40, torch.bfloat16), (6, 41, torch.float16)):
    g = torch.Generator().manual_seed(F)
    feats = torch.randn(B, T, F, generator=g).to(dtype)
    emb = torch.randn(F, generator=g).to(dtype)
    lengths = torch.tensor([T, T - 1, 700, 0, 5, 899])[:B]
    p = dict(mask_prob=0.02, block_size=40, min_start=16, left_context=300, max_mask_ratio=0.8, align=1)
    masked, mask = torch.ops.streamssl.causal_block_mask(feats, lengths, emb, 31, 2, *p.values())
    # The mask does not depend on F: the reference runs on one feature column.
    ref = reference.causal_block_mask(feats[:, :, :1], lengths, emb[:1], 31, 2, **p)[1]
    assert torch.equal(mask, ref) and mask.float().mean() > 0.1
    want = torch.where(mask.unsqueeze(-1), emb, feats)
    assert torch.equal(masked.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
print("ok")
"""


@needs_kernels
@pytest.mark.parametrize("llc_bytes", ["0", str(2**60)], ids=["streaming_stores", "cached_stores"])
def test_cpu_kernel_write_paths(llc_bytes):
    """The CPU write bypasses the caches when input + output exceed the last-level cache
    (rows of a multiple of 16 bytes). STREAMSSL_CPU_LLC_BYTES forces either path in a fresh
    process; both must be bit copies (81 float32 and 41 float16 rows never stream)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, STREAMSSL_CPU_LLC_BYTES=llc_bytes)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _LARGE_OUTPUT_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@needs_kernels
def test_start_threshold_boundary():
    """u < mask_prob exactly at the 2^-24 grid: the kernels' integer threshold vs float64."""
    T = 2048
    feats, lengths, emb = make_inputs(2, T, 1, lengths=[T, T])
    # block_size 1, no cap, no min_start: the mask is exactly the set of drawn starts.
    p_free = dict(block_size=1, min_start=0, max_mask_ratio=1.0)
    u = torch.stack([reference.mask_uniforms(7, 3, b, torch.arange(T)) for b in range(2)])
    for q in (0.01, 0.3, 0.5, 0.77):
        at = float(torch.quantile(u.flatten(), q))  # a drawn value, on the grid
        for p in (at, math.nextafter(at, 1.0), math.nextafter(at, 0.0), at + 2.0**-25):
            _, mask = kernel(feats, lengths, emb, 7, 3, mask_prob=p, **p_free)
            assert torch.equal(mask, u < p), p


# --------------------------------------------------------------------------------------------
# properties of the rule (checked on the op as users call it: kernel, or reference fallback)
# --------------------------------------------------------------------------------------------

def _candidates(seed, offset, b, L, p):
    """Drawn starts of utterance b from the reference Philox (independent of the kernels)."""
    first = -(-p["min_start"] // p["align"]) * p["align"]
    if first >= L:
        return []
    s = torch.arange(first, L, p["align"])
    return s[reference.mask_uniforms(seed, offset, b, s) < p["mask_prob"]].tolist()


def _window(e, p):
    w = min(p["left_context"], e) if p["left_context"] > 0 else e
    return e - w, math.floor(p["max_mask_ratio"] * w)


PROPERTY_PARAMS = [
    dict(DEFAULTS),
    dict(DEFAULTS, mask_prob=0.08, block_size=20, left_context=64, max_mask_ratio=0.5),
    dict(DEFAULTS, mask_prob=0.2, block_size=7, min_start=5, align=4, max_mask_ratio=0.3),
    dict(DEFAULTS, mask_prob=1.0, block_size=5, min_start=0, left_context=12, max_mask_ratio=0.7),
]


@pytest.mark.parametrize("p", PROPERTY_PARAMS, ids=["defaults", "left_context", "align", "all_draw"])
def test_masked_range_and_window_cap(p):
    """Checked from the outputs alone, not by rerunning the sequential scan.

    * nothing masked at t >= L or t < min_start; masked = where(mask, emb, feats);
    * every maximal masked run starts with a drawn start s whose block [s, e) passed the cap:
      masked frames of the final mask in [e - W, s) plus e - max(e - W, s) <= floor(ratio * W)
      (frames below s are final when s is judged, since later blocks start later);
    * fixed point: the final mask is exactly the union of the blocks of the drawn starts that
      pass that test against the final mask. The rule's output is the only mask with this
      property (induction on t), so this pins the rule down without replaying it.
    """
    B, T, F, seed, offset = 12, 700, 2, 99, 4
    feats, lengths, emb = make_inputs(B, T, F, lengths=[700, 700, 650, 333, 17, 0, 41, 700, 690, 512, 100, 699])
    masked, mask = ops.causal_block_mask(feats, lengths, emb, seed, offset, **p)
    assert_bits_equal(masked, torch.where(mask.unsqueeze(-1), emb, feats))
    t = torch.arange(T)
    assert not (mask & (t >= lengths.clamp(0, T).unsqueeze(1))).any()
    assert not mask[:, : p["min_start"]].any()
    blocks_seen = 0
    for b in range(B):
        L = int(lengths[b])
        m = mask[b].numpy()
        before = np.concatenate([[0], np.cumsum(m)])  # before[t] = masked frames in [0, t)
        cands = _candidates(seed, offset, b, L, p)

        def passes(s):
            e = min(s + p["block_size"], L)
            lo, cap = _window(e, p)
            return int(before[s] - before[min(lo, s)]) + (e - max(lo, s)) <= cap, e

        expect = np.zeros(T, dtype=bool)
        for s in cands:
            ok, e = passes(s)
            if ok:
                expect[s:e] = True
        np.testing.assert_array_equal(m, expect, err_msg=f"utterance {b}")
        run_starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
        for s in run_starts:
            assert s in cands and passes(int(s))[0]
        blocks_seen += len(run_starts)
    assert blocks_seen > 10


def test_same_utterance_same_mask_whatever_the_batch():
    """Row b's mask depends on (seed, offset, b, its length) only: not on the other rows, the
    batch size or the padding (the Philox counter holds b, so the row index must match)."""
    seed, offset, L, row = 5, 11, 300, 2
    p = dict(DEFAULTS, mask_prob=0.05, block_size=15, left_context=50)
    masks = []
    for B, T, other_len in ((3, 300, 10), (9, 451, 451), (4, 1000, 0)):
        feats, lengths, emb = make_inputs(B, T, 4, lengths=[other_len] * B, seed=B)
        lengths[row] = L
        masks.append(ops.causal_block_mask(feats, lengths, emb, seed, offset, **p)[1][row])
    assert masks[0].any()
    for m in masks[1:]:
        assert torch.equal(m[:L], masks[0]) and not m[L:].any()
    # Another row index is another utterance as far as the rule is concerned.
    feats, lengths, emb = make_inputs(4, 300, 4, lengths=[L] * 4)
    other = ops.causal_block_mask(feats, lengths, emb, seed, offset, **p)[1]
    assert torch.equal(other[row], masks[0]) and not torch.equal(other[row + 1], masks[0])


@pytest.mark.parametrize("p", PROPERTY_PARAMS[:3], ids=["defaults", "left_context", "align"])
def test_prefix_property(p):
    """Causal: a shorter utterance's (or a truncated batch's) mask equals the longer one's on
    [0, L1 - block_size + 1). Only starts s with s + block_size > L1 see a clipped block, and
    frames before the first such start are decided by unclipped blocks in both cases."""
    B, T, seed = 6, 900, 123
    feats, full_len, emb = make_inputs(B, T, 2, lengths=[T] * B)
    full = ops.causal_block_mask(feats, full_len, emb, seed, 0, **p)[1]
    for L1 in (1, 39, 40, 41, 137, 512, 899):
        keep = max(0, L1 - p["block_size"] + 1)
        short = ops.causal_block_mask(feats, torch.full((B,), L1), emb, seed, 0, **p)[1]
        assert torch.equal(short[:, :keep], full[:, :keep]) and not short[:, L1:].any()
        # Chunk-by-chunk generation: the first L1 frames alone, lengths clipped by T.
        chunk = ops.causal_block_mask(feats[:, :L1], full_len, emb, seed, 0, **p)[1]
        assert torch.equal(chunk, short[:, :L1])
    assert full.any()


def test_default_mask_fraction_16s():
    """Mean masked fraction with the defaults on 16 s (1600-frame) utterances: about 0.32.

    Expected value: ignoring the cap, frame t >= 16 is masked unless none of the
    n_t = min(t - 15, 40) starts that reach it draws: E = (1/1600) sum_t 1 - 0.99^n_t = 0.3240.
    The 0.8 prefix cap only removes blocks (it rarely binds: a block of 40 ending at e is refused
    only if more than 0.8 e - 40 earlier frames are masked). Utterances use independent Philox
    streams, so the mean of N per-utterance fractions has standard error sd / sqrt(N), sd
    estimated from the sample (about 0.07, so 0.0022 for N = 1024). The tolerance is 5 standard
    errors (a two-sided normal tail of 6e-7); the cap's effect must fit inside it too.
    """
    B, T = 1024, 1600
    p = DEFAULTS
    expected = sum(1 - (1 - p["mask_prob"]) ** min(t - 15, 40) for t in range(16, T)) / T
    assert abs(expected - 0.324) < 5e-4
    feats, lengths, emb = torch.zeros(B, T, 1), torch.full((B,), T), torch.zeros(1)
    for seed in (0, 1):
        frac = ops.causal_block_mask(feats, lengths, emb, seed, 0)[1].double().mean(dim=1)
        se = float(frac.std()) / math.sqrt(B)
        assert 0.05 < float(frac.std()) < 0.1
        assert abs(float(frac.mean()) - expected) <= 5 * se, (float(frac.mean()), expected, se)
        assert abs(float(frac.mean()) - 0.32) <= 5 * se + abs(expected - 0.32)


def test_offsets_and_seeds_change_the_mask():
    feats, lengths, emb = make_inputs(4, 500, 2, lengths=[500] * 4)
    masks = {(s, o): ops.causal_block_mask(feats, lengths, emb, s, o)[1] for s in (0, 1, 2**32) for o in (0, 1, 2**32)}
    # offset enters the counter mod 2^32 (docs/ARCHITECTURE.md); every other pair gives a different mask.
    for s in (0, 1, 2**32):
        assert torch.equal(masks[(s, 0)], masks[(s, 2**32)])
    distinct = {masks[(s, o)].numpy().tobytes() for s in (0, 1, 2**32) for o in (0, 1)}
    assert len(distinct) == 6


# --------------------------------------------------------------------------------------------
# registration: opcheck, fake/meta, gradients
# --------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(dtype):
    feats, lengths, emb = make_inputs(3, 70, 5, dtype, lengths=[70, 50, 3])
    feats = torch.randn_like(feats)  # opcheck compares outputs with assert_close: no NaN
    feats.requires_grad_(True)
    emb.requires_grad_(True)
    args = (feats, lengths, emb, 3, 1, 0.05, 10, 2, 20, 0.7, 2)
    torch.library.opcheck(torch.ops.streamssl.causal_block_mask.default, args)


@needs_kernels
def test_meta_and_fake_tensors_match_cpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    feats, lengths, emb = make_inputs(3, 40, 6, torch.bfloat16)
    masked, mask = kernel(feats, lengths, emb, 1, 2)
    meta = kernel(feats.to("meta"), lengths.to("meta"), emb.to("meta"), 1, 2)
    with FakeTensorMode() as mode:
        fake = kernel(mode.from_tensor(feats), mode.from_tensor(lengths), mode.from_tensor(emb), 1, 2)
    for out in (meta, fake):
        for got, ref in zip(out, (masked, mask)):
            assert got.shape == ref.shape and got.dtype == ref.dtype and got.stride() == ref.stride()
    # Non-contiguous input: the op returns contiguous outputs with the same values.
    t_feats = feats.transpose(0, 1).contiguous().transpose(0, 1)
    got = kernel(t_feats, lengths, emb, 1, 2)
    assert got[0].is_contiguous() and torch.equal(got[1], mask)
    assert_bits_equal(got[0], masked)


def test_gradients_float64():
    """d masked / d feats is the unmasked indicator, d masked / d emb sums the masked rows."""
    feats, lengths, emb = make_inputs(2, 16, 3, torch.float64, lengths=[16, 13])
    feats = torch.randn_like(feats)  # gradcheck needs finite inputs
    feats.requires_grad_(True)
    emb.requires_grad_(True)
    p = dict(mask_prob=0.2, block_size=5, min_start=0)

    def f(x, e):
        return ops.causal_block_mask(x, lengths, e, 8, 0, **p)[0]

    assert torch.autograd.gradcheck(f, (feats, emb))
    mask = ops.causal_block_mask(feats, lengths, emb, 8, 0, **p)[1]
    assert mask.any() and not mask.all()
    grad = torch.randn(2, 16, 3, dtype=torch.float64)
    gx, ge = torch.autograd.grad(f(feats, emb), (feats, emb), grad)
    keep = mask.unsqueeze(-1)
    assert torch.equal(gx, torch.where(keep, 0.0, grad))
    torch.testing.assert_close(ge, (grad * keep).sum((0, 1)), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# bad inputs: a ValueError naming the argument, from the public function and from the op itself
# --------------------------------------------------------------------------------------------

def _bad_cases():
    f, l, e = make_inputs(2, 10, 3, lengths=[10, 4])
    ok = dict(mask_prob=0.1, block_size=3, min_start=0, max_mask_ratio=0.5, align=1)
    return [
        ("feats", (f[0], l, e[:10]), ok),
        ("feats", (f.to(torch.int32), l, e), ok),
        ("lengths", (f, l[:1], e), ok),
        ("lengths", (f, l.view(2, 1), e), ok),
        ("lengths", (f, l.to(torch.int32), e), ok),
        ("lengths", (f, torch.tensor([10, -1]), e), ok),
        ("mask_embedding", (f, l, e[:2]), ok),
        ("mask_embedding", (f, l, e.double()), ok),
        ("mask_prob", (f, l, e), dict(ok, mask_prob=-0.01)),
        ("mask_prob", (f, l, e), dict(ok, mask_prob=1.5)),
        ("mask_prob", (f, l, e), dict(ok, mask_prob=float("nan"))),
        ("max_mask_ratio", (f, l, e), dict(ok, max_mask_ratio=1.01)),
        ("max_mask_ratio", (f, l, e), dict(ok, max_mask_ratio=-1.0)),
        ("block_size", (f, l, e), dict(ok, block_size=0)),
        ("min_start", (f, l, e), dict(ok, min_start=-1)),
        ("align", (f, l, e), dict(ok, align=0)),
    ]


@pytest.mark.parametrize("name,args,params", _bad_cases(),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_cases())])
def test_bad_inputs_raise_naming_the_argument(name, args, params):
    before = [a.clone() for a in args]
    with pytest.raises(ValueError, match=name):
        ops.causal_block_mask(*args, 0, 0, **params)
    if _has_kernels():
        with pytest.raises(ValueError, match=name):
            kernel(*args, 0, 0, **{**DEFAULTS, **params})
    for a, b in zip(args, before):  # nothing written
        assert_bits_equal(a, b)


def test_bad_device_and_seed_types():
    f, l, e = make_inputs(2, 10, 3)
    with pytest.raises(ValueError, match="lengths"):
        ops.causal_block_mask(f, l.to("meta"), e, 0)
    with pytest.raises(ValueError, match="mask_embedding"):
        ops.causal_block_mask(f, l, e.to("meta"), 0)
    with pytest.raises(TypeError, match="seed"):
        ops.causal_block_mask(f, l, e, 1.5)
    with pytest.raises(TypeError, match="offset"):
        ops.causal_block_mask(f, l, e, 1, "2")


def test_empty_shapes():
    for B, T, F in ((0, 5, 3), (2, 0, 3), (2, 5, 0)):
        feats, lengths, emb = torch.randn(B, T, F), torch.full((B,), T), torch.randn(F)
        masked, mask = ops.causal_block_mask(feats, lengths, emb, 0, mask_prob=1.0, min_start=0, max_mask_ratio=1.0)
        assert masked.shape == (B, T, F) and mask.shape == (B, T)
        assert bool(mask.all())  # every frame starts an accepted block


# --------------------------------------------------------------------------------------------
# CUDA == CPU (with a GPU)
# --------------------------------------------------------------------------------------------

@needs_kernels
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_cuda_matches_cpu(case):
    if ops.backend() != "cuda+cpu":
        pytest.skip("the extension was built without CUDA")
    _, B, T, F, lengths, params = case
    for i, dtype in enumerate(DTYPES):
        feats, lengths_t, emb = make_inputs(B, T, F, dtype, lengths, seed=i)
        cpu = kernel(feats, lengths_t, emb, 77 + i, i, **params)
        gpu = kernel(feats.cuda(), lengths_t.cuda(), emb.cuda(), 77 + i, i, **params)
        assert gpu[0].device.type == "cuda" and gpu[1].device.type == "cuda"
        assert torch.equal(gpu[1].cpu(), cpu[1])
        assert_bits_equal(gpu[0], cpu[0])
        # Misaligned storage: the write kernel falls back to narrower vectors.
        off = torch.empty(feats.numel() + 1, dtype=dtype, device="cuda")[1:].view(feats.shape)
        off.copy_(feats)
        got = kernel(off, lengths_t.cuda(), emb.cuda(), 77 + i, i, **params)
        assert_bits_equal(got[0], cpu[0])


@needs_kernels
@needs_cuda
@pytest.mark.cuda
def test_cuda_large_and_negative_lengths():
    if ops.backend() != "cuda+cpu":
        pytest.skip("the extension was built without CUDA")
    feats, _, emb = make_inputs(33, 5000, 80, torch.bfloat16)
    lengths = torch.randint(-5, 5200, (33,))
    # CUDA does not look at lengths on the host: negatives count as 0 (the rule's clamp).
    gpu = kernel(feats.cuda(), lengths.cuda(), emb.cuda(), 3, 9, left_context=400)
    cpu = kernel(feats, lengths.clamp(min=0), emb, 3, 9, left_context=400)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert_bits_equal(gpu[0], cpu[0])


@needs_kernels
@needs_cuda
@pytest.mark.cuda
def test_cuda_no_host_sync():
    if ops.backend() != "cuda+cpu":
        pytest.skip("the extension was built without CUDA")
    feats, lengths, emb = make_inputs(4, 300, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masked, mask = ops.causal_block_mask(feats, lengths, emb, 1, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert masked.shape == feats.shape and mask.shape == (4, 300)
