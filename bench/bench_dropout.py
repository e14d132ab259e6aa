"""Counter-based dropout (ops.philox_dropout) against PyTorch's dropout, all in one run.

    PYTHONPATH=$PWD python -m pytest bench/bench_dropout.py --benchmark-only \
        --benchmark-json=/tmp/dropout.json
    python bench/bench_dropout.py /tmp/dropout.json     # markdown tables with ratios

float32 maps of the large config's step (B = 8 x 4 s = 50 frames after 8x subsampling): the
feed-forward hidden map (8, 50, 2048) and a residual branch (8, 50, 512). Groups
"<case> <shape> threads=<n>":
  forward:   philox   ops.philox_dropout (the mask drawn from the seed, nothing stored)
             torch    torch.nn.functional.dropout(training=True) (Bernoulli draw, mask kept)
             mul      x * scale: the memory floor of any pass that reads x and writes y
  fwd+bwd:   philox / torch: forward, then the gradient of the input from a given upstream
             gradient (philox regenerates its mask; torch multiplies by the stored one)
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from ratio_tables import markdown

import streamssl.ops as ops

SHAPES = {"ff hidden": (8, 50, 2048), "residual": (8, 50, 512)}
THREADS = sorted({1, torch.get_num_threads()})
P = 0.1


@pytest.mark.parametrize("name", ["philox", "torch", "mul"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("num_threads", THREADS, indirect=True)
def test_dropout(benchmark, mode, name, shape, num_threads):
    if mode == "fwd+bwd" and name == "mul":
        pytest.skip("the floor is a forward pass")
    benchmark.group = f"{mode} {shape} {SHAPES[shape]} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads, impl=name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES[shape], generator=g).requires_grad_(mode == "fwd+bwd")
    grad = torch.randn(SHAPES[shape], generator=g)
    fn = {
        "philox": lambda t: ops.philox_dropout(t, P, 1234),
        "torch": lambda t: F.dropout(t, P, training=True),
        "mul": lambda t: t * (1 / (1 - P)),
    }[name]
    if mode == "forward":
        benchmark(lambda: fn(x))
    else:
        benchmark(lambda: torch.autograd.grad(fn(x), x, grad))


if __name__ == "__main__":
    print(markdown(sys.argv[1], reference="torch", floor="mul"))
