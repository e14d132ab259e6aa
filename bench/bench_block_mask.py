"""causal_block_mask on CPU at B=32, T=2000, F=80 against PyTorch baselines, all in one run.

    PYTHONPATH=$PWD python -m pytest bench/bench_block_mask.py --benchmark-only

Compared (group "causal_block_mask <dtype>"):
  kernel      streamssl.ops.causal_block_mask (the C++ kernel; reference if none was built)
  reference   streamssl.ops.reference.causal_block_mask (the rule in PyTorch, loops per block)
  nemo_loop   NeMo-v1 style: per utterance a binomial block count, randperm starts, a Python
              loop writing blocks, then where(); no window cap
  vectorised  Bernoulli starts, causal max-pool dilation to blocks, where(); no window cap
              (the cap is sequential, so this is a lower bound for any all-PyTorch version)
  clone       feats.clone(): the memory floor (the op reads feats and writes a new tensor)
Targets (issue 3): kernel <= 1.5x clone, kernel >= 2x faster than vectorised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import streamssl.ops as ops
from streamssl.ops import reference

B, T, FEAT = 32, 2000, 80
P = dict(mask_prob=0.01, block_size=40, min_start=16, left_context=-1, max_mask_ratio=0.8, align=1)


def make(dtype):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B, T, FEAT, generator=g).to(dtype)
    lengths = torch.randint(T * 3 // 4, T + 1, (B,), generator=g)
    lengths[0] = T
    emb = torch.randn(FEAT, generator=g).to(dtype)
    return feats, lengths, emb


def nemo_loop(feats, lengths, emb, mask_prob, block_size, min_start, **_):
    Bn, Tn, _ = feats.shape
    mask = torch.zeros(Bn, Tn, dtype=torch.bool)
    for b, L in enumerate(lengths.tolist()):
        n = L - min_start
        if n <= 0:
            continue
        count = int(torch.binomial(torch.tensor(float(n)), torch.tensor(mask_prob)))
        for s in (torch.randperm(n)[:count] + min_start).tolist():
            mask[b, s : min(s + block_size, L)] = True
    return torch.where(mask.unsqueeze(-1), emb, feats), mask


def vectorised(feats, lengths, emb, mask_prob, block_size, min_start, **_):
    Bn, Tn, _ = feats.shape
    t = torch.arange(Tn)
    valid = t < lengths.unsqueeze(1)
    starts = (torch.rand(Bn, Tn) < mask_prob) & valid & (t >= min_start)
    covered = F.max_pool1d(F.pad(starts.unsqueeze(1).float(), (block_size - 1, 0)), block_size, stride=1)
    mask = (covered.squeeze(1) > 0) & valid
    return torch.where(mask.unsqueeze(-1), emb, feats), mask


IMPLS = {
    "kernel": lambda f, l, e: ops.causal_block_mask(f, l, e, 1234, 7, **P),
    "reference": lambda f, l, e: reference.causal_block_mask(f, l, e, 1234, 7, **P),
    "nemo_loop": lambda f, l, e: nemo_loop(f, l, e, **P),
    "vectorised": lambda f, l, e: vectorised(f, l, e, **P),
    "clone": lambda f, l, e: f.clone(),
}
THREADS = sorted({1, torch.get_num_threads()})
CASES = [(name, torch.float32, n) for n in THREADS for name in IMPLS] + [
    (name, torch.bfloat16, n) for n in THREADS for name in ("kernel", "vectorised", "clone")
]


@pytest.mark.parametrize("name,dtype,num_threads", CASES, indirect=["num_threads"],
                         ids=[f"{n}-{str(d).split('.')[-1]}-{k}thr" for n, d, k in CASES])
def test_block_mask_cpu(benchmark, name, dtype, num_threads):
    benchmark.group = f"causal_block_mask B={B} T={T} F={FEAT} {str(dtype).split('.')[-1]} threads={num_threads}"
    benchmark.extra_info.update(backend=ops.backend(), threads=num_threads)
    feats, lengths, emb = make(dtype)
    out = benchmark(IMPLS[name], feats, lengths, emb)
    if name != "clone":
        masked, mask = out
        assert masked.shape == feats.shape and 0.2 < float(mask.float().mean()) < 0.45
