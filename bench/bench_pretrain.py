"""Pretraining throughput on CPU (audio seconds per wall second), fused ops vs reference ops.

    PYTHONPATH=$PWD python -m pytest bench/bench_pretrain.py --benchmark-only

One optimiser step (features, quantizer targets, augmentation, masking, encoder forward and
backward, AdamW) of the NEST model on a fixed batch of the demo corpus, for the demo and small
presets, in two variants in the same run:
  fused      streamssl's C++ kernels for causal_block_mask and causal_dwconv_ln
  reference  the pure-PyTorch reference ops for both (streamssl.ops.reference)
Throughput = audio seconds in the batch / median step time (``extra_info["audio_sec_per_sec"]``).
"""

from __future__ import annotations

import pytest
import torch

import streamssl.ssl.masking as masking
from streamssl.config import load_config
from streamssl.data.demo import make_demo_corpus
from streamssl.data.loader import build_loader
from streamssl.data.manifest import load_manifest
from streamssl.ops import reference
from streamssl.ssl.nest import NEST

BATCH_SECONDS = {"demo": 60.0, "small": 30.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), n_train=48, n_val=1, n_noise=2)


def _batch(corpus, seconds):
    loader = build_loader(load_manifest(corpus.train), load_manifest(corpus.noise), batch_seconds=seconds, seed=0)
    return next(iter(loader))


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("preset", ["demo", "small"])
def test_pretrain_step(benchmark, corpus, monkeypatch, preset, impl):
    cfg = load_config(preset, ["data.train_manifest=unused"])
    torch.manual_seed(0)
    model = NEST(cfg.model, seed=0, conv_impl="op" if impl == "fused" else "reference").train()
    if impl == "reference":
        monkeypatch.setattr(masking, "causal_block_mask", reference.causal_block_mask)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _batch(corpus, BATCH_SECONDS[preset])
    args = (batch["audio"], batch["audio_lengths"], batch["noise"], batch["noise_lengths"])

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(*args, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        opt.step()

    benchmark.group = f"pretrain step {preset}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    seconds = float(batch["audio_lengths"].sum()) / cfg.model.features.sample_rate
    benchmark.extra_info["audio_seconds"] = seconds
    benchmark.extra_info["audio_sec_per_sec"] = seconds / benchmark.stats.stats.median
