"""Encoder benchmarks (pytest-benchmark), CPU.

Run:  PYTHONPATH=$PWD python -m pytest bench/bench_encoder.py --benchmark-only -q

* Streaming real-time factor of the ``small`` preset with one thread, at the smallest chunk each
  context allows (RTF = compute time / audio time; below 1 keeps up with live audio).
* Offline forward+backward step of the ``small`` preset (B = 2, 8 s) in three variants, same run:
  ``op`` (``streamssl.ops.causal_dwconv_ln``, the fused kernels when the extension is built),
  ``reference`` (``streamssl.ops.reference.causal_dwconv_ln``, the pure-PyTorch composition), and
  ``floor`` (the conv module's depthwise conv + LayerNorm + Swish replaced by the identity: the
  step time no conv kernel can go below). Report ratios to ``reference``.
"""

import pytest
import torch

from streamssl.nn import CausalConvModule, build_encoder

SECONDS = 4.0
FRAMES = int(SECONDS * 100)  # 10 ms hop


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


@pytest.mark.parametrize("ctx", [(-1, 0), (-1, 3), (64, 0)], ids=["causal-80ms", "lookahead-320ms", "left64-80ms"])
def test_streaming_rtf_small_one_thread(benchmark, threads, ctx):
    threads(1)
    torch.manual_seed(0)
    enc = build_encoder({"preset": "small", "att_context_size": ctx}).eval()
    step = enc.stream_chunk_frames()
    feats = torch.randn(1, FRAMES, 80)
    full = torch.tensor([step])

    @torch.inference_mode()
    def stream():
        state = enc.init_stream_state(1)
        for s in range(FRAMES // step):
            _, _, state = enc.stream_step(feats[:, s * step : (s + 1) * step], full, state)

    benchmark.group = "encoder streaming (small, 1 thread, 4 s utterance)"
    benchmark.pedantic(stream, rounds=3, iterations=1, warmup_rounds=1)
    rtf = benchmark.stats.stats.mean / SECONDS
    benchmark.extra_info.update(rtf=round(rtf, 4), chunk_ms=enc.chunk_ms(), latency_ms=enc.latency_ms())
    print(f"\nstreaming {ctx}: chunk {enc.chunk_ms():.0f} ms, RTF {rtf:.4f}")


@pytest.mark.parametrize("variant", ["op", "reference", "floor"])
def test_offline_step_small(benchmark, monkeypatch, variant):
    torch.manual_seed(0)
    impl = "reference" if variant == "reference" else "op"
    enc = build_encoder({"preset": "small", "conv_impl": impl}).train()
    if variant == "floor":
        monkeypatch.setattr(CausalConvModule, "_middle", lambda self, h, cache: (h, cache))
    feats = torch.randn(2, 2 * FRAMES, 80)
    lengths = torch.tensor([2 * FRAMES, 650])

    def step():
        enc.zero_grad(set_to_none=True)
        out, _ = enc(feats, lengths)
        out.square().mean().backward()

    benchmark.group = "encoder forward+backward (small, B=2 x 8 s)"
    # Several rounds and the minimum: the 2-core machine is shared, so means drift with its load.
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(variant=variant, threads=torch.get_num_threads())
