"""philox_dropout (counter-based dropout) and the encoder's Dropout module.

The op must equal its reference bit for bit (the rule is integer arithmetic plus one rounded
product), for every dtype, size, thread count and instruction set; the reference's element-to-word
layout is checked against a per-element reading of the rule, and the Philox words themselves
against Random123's known answers (tests/test_block_mask.py). The statistics tests bound the kept
fraction and the correlations a wrong layout or key would produce (a reused word, a shared key).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import streamssl.ops as ops
from streamssl.nn.dropout import Dropout, draw_seed
from streamssl.ops import reference

HAS_EXTENSION = ops.backend() != "reference"
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0 differs from 0 and NaN payloads count)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def test_reference_layout_reads_the_rule_element_by_element():
    """Element n = 32 g + 8 j + l takes word j of Philox block 8 g + l, key = seed's two halves."""
    seed = 2**64 - 12345  # both key words nonzero, the high bit set
    n = torch.arange(0, 200, dtype=torch.int64)
    block = (n // 32) * 8 + n % 8
    words = reference.philox4x32_10((block, 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
    expected = torch.stack(words).gather(0, ((n % 32) // 8)[None])[0]
    assert torch.equal(reference.dropout_words(200, seed), expected)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1 - 2.0**-33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_equals_the_reference_bit_for_bit(dtype, p):
    gen = torch.Generator().manual_seed(1)
    for n in (0, 1, 31, 32, 33, 64, 65, 127, 1000, 40_003):
        x = torch.randn(n, generator=gen).to(dtype)
        for seed in (0, -1, 2**63 + 5, 123456789):
            got = ops.philox_dropout(x, p, seed)
            assert same_bits(got, reference.dropout(x, p, seed)), (n, seed)


def test_threshold_edges():
    """p = 0 keeps every element unchanged; p just below 1 keeps none (and gives +-0, NaN for NaN)."""
    x = torch.randn(1000)
    assert same_bits(ops.philox_dropout(x, 0.0, 3), x)
    y = ops.philox_dropout(x, 1 - 2.0**-40, 3)
    assert torch.equal(y, torch.zeros_like(x))
    # ceil(p * 2^32) = 1 for the smallest positive p: only the word 0 is dropped.
    words = reference.dropout_words(1000, 3)
    kept = ops.philox_dropout(torch.ones(1000, dtype=torch.float64), 2.0**-40, 3) != 0
    assert torch.equal(kept, words >= 1)


def test_dropped_nan_stays_nan_and_kept_values_are_scaled():
    x = torch.full((4096,), float("nan"))
    assert torch.isnan(ops.philox_dropout(x, 0.5, 1)).all()
    x = torch.randn(4096, dtype=torch.float64)
    y = ops.philox_dropout(x, 0.25, 9)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1 / 0.75))


def test_any_strides_read_in_row_major_order():
    x = torch.randn(6, 40, 33)
    t = x.transpose(0, 2)
    assert same_bits(ops.philox_dropout(t, 0.3, 11), ops.philox_dropout(t.contiguous(), 0.3, 11))
    assert ops.philox_dropout(t, 0.3, 11).is_contiguous()


@needs_extension
def test_same_bits_for_every_thread_count():
    x = torch.randn(3, 100_003)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.philox_dropout(x, 0.1, 5)
        torch.set_num_threads(2)
        two = ops.philox_dropout(x, 0.1, 5)
    finally:
        torch.set_num_threads(threads)
    assert same_bits(one, two)


_BASELINE_CHECK = """
import torch, streamssl.ops as ops
x = torch.randn(70_001, generator=torch.Generator().manual_seed(0))
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    torch.save(ops.philox_dropout(x.to(dtype), 0.2, 77), f"{OUT}/{str(dtype)[6:]}.pt")
"""


@needs_extension
def test_baseline_and_avx2_kernels_give_the_same_bits(tmp_path):
    """STREAMSSL_CPU_BASELINE=1 forces the kernel without AVX2 (the scalar common Philox)."""
    env = {**os.environ, "STREAMSSL_CPU_BASELINE": "1"}
    code = f"OUT = {str(tmp_path)!r}\n" + _BASELINE_CHECK
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    x = torch.randn(70_001, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert same_bits(torch.load(tmp_path / f"{str(dtype)[6:]}.pt"), ops.philox_dropout(x.to(dtype), 0.2, 77))


def _within(count: int, n: int, prob: float, sigmas: float = 6.0) -> bool:
    return abs(count - n * prob) <= sigmas * math.sqrt(n * prob * (1 - prob))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_and_independence(p):
    """Binomial counts within 6 sigma: overall, for neighbours (n, n+1), for elements sharing a
    Philox block (n, n+8) and between two seeds."""
    n = 1 << 20
    ones = torch.ones(n)
    keep = ops.philox_dropout(ones, p, 2024) != 0
    other = ops.philox_dropout(ones, p, 2025) != 0
    q = 1 - p
    assert _within(int(keep.sum()), n, q)
    assert _within(int((keep[:-1] & keep[1:]).sum()), n - 1, q * q)
    assert _within(int((keep[:-8] & keep[8:]).sum()), n - 8, q * q)
    assert _within(int((keep & other).sum()), n, q * q)


def test_words_are_uniform():
    """Chi-square of the top 4 bits of 2^18 words over 16 bins, far below the 0.1 % point (37.7)."""
    top = reference.dropout_words(1 << 18, 99) >> 28
    counts = torch.bincount(top, minlength=16).double()
    expected = (1 << 18) / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 37.7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_is_the_same_mask(dtype):
    x = torch.randn(5, 77, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 77, dtype=dtype)
    ops.philox_dropout(x, 0.3, 42).backward(g)
    assert same_bits(x.grad, ops.philox_dropout(g, 0.3, 42))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: ops.philox_dropout(t, 0.3, 42), (x.detach().requires_grad_(),))


@needs_extension
def test_opcheck():
    x = torch.randn(3, 50, 7)
    torch.library.opcheck(torch.ops.streamssl.philox_dropout.default, (x, 0.2, 13))
    torch.library.opcheck(torch.ops.streamssl.philox_dropout.default, (x.double().transpose(0, 1), 0.5, -3))


@pytest.mark.parametrize(
    "x,p,name",
    [
        (torch.ones(3), 1.0, "p"),
        (torch.ones(3), -0.1, "p"),
        (torch.ones(3), float("nan"), "p"),
        (torch.ones(3, dtype=torch.int64), 0.1, "x"),
        ([1.0, 2.0], 0.1, "x"),
    ],
)
def test_bad_arguments_name_the_argument(x, p, name):
    with pytest.raises((ValueError, TypeError), match=name):
        ops.philox_dropout(x, p, 1)


@needs_extension
def test_the_op_itself_checks_its_arguments():
    with pytest.raises(ValueError, match="p must be in"):
        torch.ops.streamssl.philox_dropout(torch.ones(3), 1.5, 1)
    with pytest.raises(ValueError, match="x must be float"):
        torch.ops.streamssl.philox_dropout(torch.ones(3, dtype=torch.int32), 0.1, 1)


def test_module_is_the_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(4, 9)
    m = Dropout(0.3).eval()
    assert m(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_module_draws_its_key_from_the_default_cpu_generator():
    """torch.manual_seed makes training reproducible (the trainer re-seeds every step); each call
    draws a new key, so two calls drop different elements."""
    x = torch.ones(8, 4096)
    m = Dropout(0.5).train()
    torch.manual_seed(3)
    a, b = m(x), m(x)
    torch.manual_seed(3)
    assert torch.equal(m(x), a)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    seed = draw_seed()
    assert torch.equal(a, ops.philox_dropout(x, 0.5, seed))
