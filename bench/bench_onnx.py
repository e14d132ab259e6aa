"""Streaming step: PyTorch eager ``stream_step`` vs the exported graph in onnxruntime.

The ``small`` preset (d 176, 16 layers, 12.6 M parameters) with att_context_size [64, 0], one
thread, batch 1, a 4 s utterance fed in 80 ms (1 encoder frame) and 320 ms (4 frames) chunks, both
runtimes in the same run (plus the quantised graphs: ``quantize="int8"`` dynamic int8, ``"int4"``
and ``"int8w"`` weight-only MatMulNBits). RTF = compute time / audio time. Features are not
included (the same for both). Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_onnx.py -s --benchmark-columns=mean,min``.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'streamssl[deploy]'")

from streamssl.nn import build_encoder  # noqa: E402
from streamssl.onnx_export import export_stream_onnx  # noqa: E402
from streamssl.runtime import OnnxStreamingEncoder  # noqa: E402

SECONDS = 4.0
CTX = [64, 0]
QUANT = (None, "int8", "int4", "int8w")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = build_encoder({"preset": "small", "att_context_size": CTX}).eval()
    feats = torch.randn(1, int(SECONDS * 100), enc.feat_in)
    d = tmp_path_factory.mktemp("onnx")
    graphs = {(cps, q): export_stream_onnx(enc, d / f"small_{cps}_{q}.onnx", chunks_per_step=cps, quantize=q)
              for cps in (1, 4) for q in QUANT}
    yield enc, feats, graphs
    torch.set_num_threads(before)


@pytest.mark.parametrize("chunks_per_step", [1, 4], ids=["80ms", "320ms"])
@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime", *(f"onnxruntime-{q}" for q in QUANT[1:])])
def test_stream_step_rtf(benchmark, setup, runtime, chunks_per_step):
    enc, feats, graphs = setup
    step = enc.stream_chunk_frames() * chunks_per_step
    n_steps = feats.shape[1] // step
    if runtime == "pytorch":
        full = torch.tensor([step])

        def stream():
            state = enc.init_stream_state(1)
            with torch.no_grad():
                for s in range(n_steps):
                    _, _, state = enc.stream_step(feats[:, s * step : (s + 1) * step], full, state)
            return state

        state_bytes = None
    else:
        q = runtime.partition("-")[2] or None
        m = OnnxStreamingEncoder(graphs[chunks_per_step, q], threads=1)
        x, full = feats.numpy(), np.array([step], dtype=np.int64)

        def stream():
            state = m.init_stream_state(1)
            for s in range(n_steps):
                _, _, state = m.stream_step(x[:, s * step : (s + 1) * step], full, state)
            return state

        state_bytes = m.init_stream_state(1).nbytes_per_stream()
    benchmark.group = f"stream step, small {CTX}, 1 thread, batch 1, {SECONDS:.0f} s"
    benchmark.pedantic(stream, rounds=5, iterations=1, warmup_rounds=1)
    rtf = benchmark.stats.stats.min / SECONDS
    ms = benchmark.stats.stats.min * 1000.0 / n_steps
    benchmark.extra_info.update(rtf=round(rtf, 4), ms_per_step=round(ms, 3), chunk_ms=step * 10,
                                state_bytes_per_stream=state_bytes)
    extra = f", state {state_bytes / 1e6:.2f} MB/stream" if state_bytes else ""
    print(f"\n{runtime:16s} {step * 10:4d} ms chunks: {ms:.2f} ms/step, RTF {rtf:.4f} (best of 5){extra}")
