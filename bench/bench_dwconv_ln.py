"""causal_dwconv_ln on CPU against the PyTorch composition, all in one run.

    PYTHONPATH=$PWD python -m pytest bench/bench_dwconv_ln.py --benchmark-only \
        --benchmark-json=/tmp/dwconv_ln.json
    python bench/bench_dwconv_ln.py /tmp/dwconv_ln.json      # the markdown tables with ratios

Compared, float32, in groups "<mode> <shape> threads=<n>":
  fused        streamssl.ops.causal_dwconv_ln (the C++ kernels through the public function)
  composition  transpose + pad (or cat with the cache) + F.conv1d(groups=C) + F.layer_norm +
               F.silu, as a Conformer conv module writes it
  clone        x.clone(): the memory floor of an op that reads x and writes a tensor like it
Modes: forward (no_grad), forward+backward (autograd.grad for x and all parameters), and the
streaming step (inference_mode, chunks of 8 frames with the K-1 frame cache, B = 1 and 16).
Targets (issue 4): forward >= 5x faster than the composition, forward+backward >= 4x,
streaming step >= 5x.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from ratio_tables import markdown

import streamssl.ops as ops

SHAPES = [(16, 500, 256, 9), (8, 1000, 512, 9)]
STREAM_B = (1, 16)
CHUNK = 8
THREADS = sorted({1, torch.get_num_threads()})


def make(B, T, C, K, *, cache=False, grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=g)
    w = torch.randn(C, K, generator=g) * K**-0.5
    b = torch.randn(C, generator=g) * 0.1
    lw = 1 + 0.2 * torch.randn(C, generator=g)
    lb = 0.2 * torch.randn(C, generator=g)
    c = torch.randn(B, K - 1, C, generator=g) if cache else None
    if grad:
        for t in (x, w, b, lw, lb):
            t.requires_grad_(True)
    return x, w, b, lw, lb, c


def composition(x, w, b, lw, lb, cache=None, eps=1e-5):
    """The unfused module middle: (B, T, C) -> conv over time on (B, C, T) -> LN over C -> Swish."""
    C, K = w.shape
    xt = x.transpose(1, 2)
    xp = F.pad(xt, (K - 1, 0)) if cache is None else torch.cat([cache.transpose(1, 2), xt], 2)
    z = F.conv1d(xp, w.unsqueeze(1), b, groups=C).transpose(1, 2)
    y = F.silu(F.layer_norm(z, (C,), lw, lb, eps))
    return y, xp[:, :, xp.shape[2] - (K - 1) :].transpose(1, 2)


def fused(x, w, b, lw, lb, cache=None):
    return ops.causal_dwconv_ln(x, w, b, lw, lb, cache)


def clone(x, *_):
    return x.clone()


IMPLS = {"fused": fused, "composition": composition, "clone": clone}


def shape_id(s):
    return "B{}xT{}xC{}xK{}".format(*s)


CASES = [(n, s, k) for k in THREADS for s in SHAPES for n in IMPLS]


@pytest.mark.parametrize("name,shape,num_threads", CASES, indirect=["num_threads"],
                         ids=[f"{n}-{shape_id(s)}-{k}thr" for n, s, k in CASES])
def test_forward(benchmark, name, shape, num_threads):
    benchmark.group = f"forward {shape_id(shape)} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads)
    x, w, b, lw, lb, _ = make(*shape)
    f = IMPLS[name]

    def run():
        with torch.no_grad():
            return f(x, w, b, lw, lb)

    benchmark(run)


GRAD_CASES = [(n, s, k) for k in THREADS for s in SHAPES for n in ("fused", "composition")]


@pytest.mark.parametrize("name,shape,num_threads", GRAD_CASES, indirect=["num_threads"],
                         ids=[f"{n}-{shape_id(s)}-{k}thr" for n, s, k in GRAD_CASES])
def test_forward_backward(benchmark, name, shape, num_threads):
    benchmark.group = f"forward+backward {shape_id(shape)} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads)
    inputs = make(*shape, grad=True)
    leaves = inputs[:5]
    gy = torch.randn(shape[:3], generator=torch.Generator().manual_seed(1))
    f = IMPLS[name]

    def run():
        y, _ = f(*leaves)
        return torch.autograd.grad(y, leaves, gy)

    grads = benchmark(run)
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, leaves))


STREAM_CASES = [(n, B, C, k) for k in THREADS for C in sorted({s[2] for s in SHAPES}) for B in STREAM_B
                for n in IMPLS]


@pytest.mark.parametrize("name,B,C,num_threads", STREAM_CASES, indirect=["num_threads"],
                         ids=[f"{n}-B{B}-C{C}-{k}thr" for n, B, C, k in STREAM_CASES])
def test_streaming_step(benchmark, name, B, C, num_threads):
    K = 9
    benchmark.group = f"streaming step B={B} chunk={CHUNK} C={C} K={K} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads)
    x, w, b, lw, lb, c = make(B, CHUNK, C, K, cache=True)
    f = IMPLS[name]

    def run():
        with torch.inference_mode():
            return f(x, w, b, lw, lb, c)

    benchmark(run)


if __name__ == "__main__":
    print(markdown(sys.argv[1], reference="composition", floor="clone"))
