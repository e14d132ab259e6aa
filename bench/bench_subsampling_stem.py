"""The subsampling stem's fused backward on CPU against autograd's, all in one run.

    PYTHONPATH=$PWD python -m pytest bench/bench_subsampling_stem.py --benchmark-only \
        --benchmark-json=/tmp/stem.json
    python bench/bench_subsampling_stem.py /tmp/stem.json     # markdown tables with ratios

Compared, float32, B = 8 x 4 s (400 frames x 80 bins, 256 channels: the y0 map is 8 x 256 x 200 x 40,
65 MB), in groups "<case> threads=<n>":
  stem backward: the parameter gradients of stage 0 (conv 1 -> 256, ReLU, padding mask) and stage 1
    (depthwise conv) from grad_y1:
      fused        streamssl.ops.subsampling_stem_backward (one pass over y0)
      composition  torch.autograd.grad through the same convolutions and ReLU in channels_last
                   (depthwise-conv backward, ReLU backward, stage-0 weight gradient)
      clone        y0.clone(): the memory floor of any pass that reads the map and writes one like it
  subsampling fwd+bwd: the whole 8x CausalStridingSubsampling (d 176), parameter gradients:
      fused        as the encoder trains it (the stem through the fused backward)
      composition  the same module stage by stage (the fused stem switched off)
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from ratio_tables import markdown

import streamssl.ops as ops
from streamssl.nn import subsampling as sub

B, T, FQ, C = 8, 400, 80, 256
THREADS = sorted({1, torch.get_num_threads()})
CL = torch.channels_last


def stem_inputs():
    """Inputs as the subsampling makes them: its own (channels_last) weights, so stage 0's output
    is channels_last like in training and nothing pays for a layout copy."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = sub.CausalStridingSubsampling(FQ, 176, 8, C)
    feats = sub._zero_padding(torch.randn(B, T, FQ, generator=g).unsqueeze(1), torch.full((B,), T))
    feats = feats.contiguous(memory_format=CL)
    params = (m.convs[0].weight, m.convs[0].bias, m.convs[1].weight)
    keep = torch.ones(B, 1, T // 2, 1)
    keep[1:, :, 150:] = 0  # ragged lengths
    y0 = sub._ReluKeep.apply(F.conv2d(feats, params[0], params[1], 2, (1, 1)), keep)
    assert y0.is_contiguous(memory_format=CL)
    y1 = F.conv2d(y0, params[2], None, 2, (1, 1), 1, C)
    grad_y1 = torch.randn(y1.shape, generator=g).contiguous(memory_format=CL)
    return feats, params, y0, y1, grad_y1


@pytest.mark.parametrize("name", ["fused", "composition", "clone"])
@pytest.mark.parametrize("num_threads", THREADS, indirect=True)
def test_stem_backward(benchmark, name, num_threads):
    benchmark.group = f"stem backward B{B} T{T} F{FQ} C{C} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads, impl=name)
    feats, params, y0, y1, grad_y1 = stem_inputs()
    if name == "fused":
        w1 = params[2].detach().reshape(C, 3, 3)
        args = (grad_y1.permute(0, 2, 3, 1), y0.detach().permute(0, 2, 3, 1), feats[:, 0], w1, 1)
        benchmark(lambda: ops.subsampling_stem_backward(*args))
    elif name == "composition":
        benchmark(lambda: torch.autograd.grad(y1, params, grad_y1, retain_graph=True))
    else:
        y = y0.detach()
        benchmark(lambda: y.clone())


@pytest.mark.parametrize("name", ["fused", "composition"])
@pytest.mark.parametrize("num_threads", THREADS, indirect=True)
def test_subsampling_forward_backward(benchmark, name, num_threads, monkeypatch):
    benchmark.group = f"subsampling fwd+bwd B{B} T{T} F{FQ} C{C} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads, impl=name)
    if name == "composition":
        monkeypatch.setattr(sub.CausalStridingSubsampling, "_fused_stem_applies", lambda self, x: False)
    torch.manual_seed(0)
    m = sub.CausalStridingSubsampling(FQ, 176, 8, C)
    feats, lengths = torch.randn(B, T, FQ), torch.tensor([T] + [300] * (B - 1))
    params = list(m.parameters())

    def run():
        y, _ = m(feats, lengths)
        return torch.autograd.grad(y.sum(), params)

    benchmark(run)


if __name__ == "__main__":
    print(markdown(sys.argv[1], reference="composition", floor="clone"))
