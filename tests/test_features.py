import json
import math

import numpy as np
import pytest
import torch

from data_fixtures import make_corpus
from streamssl.ssl.features import (LogMelFeatures, compute_global_stats, load_stats, mel_filterbank,
                                    save_stats)

EPS32 = float(np.finfo(np.float32).eps)


# -- a float64 reference written from the definition, one frame at a time -------------------------
def ref_filterbank(sr=16000, n_fft=512, n_mels=80, fmin=0.0, fmax=8000.0):
    def hz2mel(f):
        return f / (200.0 / 3.0) if f < 1000.0 else 15.0 + math.log(f / 1000.0) * 27.0 / math.log(6.4)

    def mel2hz(m):
        return m * 200.0 / 3.0 if m < 15.0 else 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)

    m0, m1 = hz2mel(fmin), hz2mel(fmax)
    edges = [mel2hz(m0 + (m1 - m0) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m:m + 3]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            w = (f - lo) / (c - lo) if lo <= f <= c else (hi - f) / (hi - c) if c < f < hi else 0.0
            fb[k, m] = w * 2.0 / (hi - lo)
    return fb


def ref_logmel(x, fb, win=400, hop=160, n_fft=512, preemph=0.97):
    """x: 1-D float64 utterance (valid samples only). Returns (T, n_mels) and a per-element error
    bound for a float32 implementation (see test_float32_matches_float64_reference)."""
    y = x - preemph * np.concatenate([[0.0], x[:-1]])
    ypad = np.concatenate([np.zeros(win - hop), y])
    window = np.hanning(win)  # symmetric Hann, = torch.hann_window(win, periodic=False)
    nnz = (fb > 0).sum(0)
    feats, bounds = [], []
    for t in range(len(x) // hop):
        frame = ypad[t * hop:t * hop + win] * window
        spec = np.fft.rfft(frame, n_fft)
        p = spec.real ** 2 + spec.imag ** 2
        mel = p @ fb
        feats.append(np.log(mel + 2.0 ** -24))
        # float32 rounding, propagated: |dX_k| <= delta from the inputs (pre-emphasis, window:
        # a few eps per sample) and the FFT (eps * log2(n) * ||X||_2, ||X||_2 = sqrt(n)||frame||);
        # |d p_k| <= 2|X_k| delta + delta^2 + eps p_k; the mel product adds nnz * eps * mel
        # (positive terms); the log maps d mel to d mel / (mel + floor) and rounds once more.
        delta = EPS32 * (math.log2(n_fft) + 4) * math.sqrt(n_fft) * np.linalg.norm(frame)
        dp = 2 * np.abs(spec) * delta + delta ** 2 + EPS32 * p
        dmel = dp @ fb + nnz * EPS32 * mel
        bounds.append(dmel / (mel + 2.0 ** -24) + EPS32 * np.abs(feats[-1]))
    return np.array(feats).reshape(-1, fb.shape[1]), np.array(bounds).reshape(-1, fb.shape[1])


@pytest.fixture(scope="module")
def speechlike():
    """Three ragged utterances of demo-corpus speech (formants, pitch, silence), float32."""
    from streamssl.data.demo import synthesize_utterance
    rng = np.random.default_rng(0)
    waves = [synthesize_utterance(rng, 2.0, f0, vtl)[0] for f0, vtl in ((110, 0.95), (210, 1.1), (150, 1.0))]
    lengths = [16000 * 2 + 37, 23456, 9999]
    waves = [w[:n] for w, n in zip(waves, lengths)]
    audio = torch.zeros(3, max(lengths))
    for i, w in enumerate(waves):
        audio[i, :len(w)] = torch.from_numpy(w.astype(np.float32))
    return audio, torch.tensor(lengths)


def test_filterbank_matches_the_reference():
    np.testing.assert_allclose(mel_filterbank(16000, 512, 80), ref_filterbank(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mel_filterbank(16000, 512, 40, 20.0, 7600.0),
                               ref_filterbank(16000, 512, 40, 20.0, 7600.0), rtol=1e-12, atol=1e-15)


def test_float64_path_matches_the_reference_exactly_up_to_float64_rounding(speechlike):
    audio, lengths = speechlike
    m = LogMelFeatures().eval()
    feats, fl = m(audio.double(), lengths)
    fb = ref_filterbank()
    assert feats.dtype == torch.float64
    for b in range(3):
        ref, _ = ref_logmel(audio[b, :lengths[b]].double().numpy(), fb)
        assert fl[b] == ref.shape[0] == lengths[b] // 160
        # Both sides are float64; the worst element here is a bin ~14 decades below its frame's
        # energy where the FFT's absolute rounding (1e-16 * ||frame||) is relatively large.
        np.testing.assert_allclose(feats[b, :fl[b]].numpy(), ref, rtol=0, atol=1e-8)


def test_float32_matches_float64_reference(speechlike):
    audio, lengths = speechlike
    feats, fl = LogMelFeatures().eval()(audio, lengths)
    assert feats.dtype == torch.float32 and fl.dtype == torch.int64
    fb = ref_filterbank()
    for b in range(3):
        ref, bound = ref_logmel(audio[b, :lengths[b]].double().numpy(), fb)
        err = np.abs(feats[b, :fl[b]].double().numpy() - ref)
        assert (err <= bound).all(), f"worst excess {np.max(err / bound):.2f}x the float32 rounding bound"
        # The bound is a worst case, yet tight enough to catch definition errors: a one-sample
        # framing shift or a pre-emphasis of 0.96 leaves most elements outside it.
        x = audio[b, :lengths[b]].double().numpy()
        shifted, _ = ref_logmel(np.concatenate([[0.0], x[:-1]]), fb)
        other, _ = ref_logmel(x, fb, preemph=0.96)
        assert np.mean(np.abs(shifted - ref) > bound) > 0.5
        assert np.mean(np.abs(other - ref) > bound) > 0.5


def test_shapes_padding_and_causality(speechlike):
    audio, lengths = speechlike
    m = LogMelFeatures().eval()
    feats, fl = m(audio, lengths)
    T = audio.shape[1] // 160
    assert feats.shape == (3, math.ceil(T / 16) * 16, 80)
    torch.testing.assert_close(fl, lengths // 160, rtol=0, atol=0)
    for b in range(3):
        assert not feats[b, fl[b]:].any()
    # Garbage after each utterance's end changes nothing (same shapes, so bitwise).
    noisy = audio.clone()
    for b in range(3):
        noisy[b, lengths[b]:] = torch.randn(audio.shape[1] - lengths[b])
    noisy[1, -1] = float("nan")
    torch.testing.assert_close(m(noisy, lengths)[0], feats, rtol=0, atol=0)
    # Frame t only sees samples before (t + 1) * hop: changing samples from there on keeps frames <= t.
    t = 50
    late = audio.clone()
    late[:, (t + 1) * 160:] += torch.randn_like(late[:, (t + 1) * 160:])
    f2, _ = m(late, lengths)
    torch.testing.assert_close(f2[:, :t + 1], feats[:, :t + 1], rtol=0, atol=0)
    assert not torch.equal(f2[0, t + 1], feats[0, t + 1])


def test_short_input_gives_zero_frames():
    feats, fl = LogMelFeatures().eval()(torch.randn(2, 100), torch.tensor([100, 50]))
    assert feats.shape == (2, 0, 80) and fl.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_streaming_equals_full_utterance(speechlike, dtype):
    audio, lengths = speechlike
    audio = audio.to(dtype)
    m = LogMelFeatures().eval()
    full, _ = m(audio, torch.full((3,), audio.shape[1]))
    sizes = [1, 159, 160, 0, 401, 3333, 7000]
    sizes.append(audio.shape[1] - sum(sizes))
    cache, outs = None, []
    for chunk in torch.split(audio, sizes, dim=1):
        out, cache = m.stream_step(chunk, cache)
        outs.append(out)
        assert m.cache_samples <= cache.shape[1] < m.cache_samples + 160
    streamed = torch.cat(outs, 1)
    T = audio.shape[1] // 160
    assert streamed.shape == (3, T, 80)
    # Same arithmetic per frame except the (frames x 257) @ (257 x 80) mel product, whose BLAS
    # summation order depends on the number of frames: at most nnz-per-filter (< 64 here) roundings
    # of a sum of positive terms, i.e. |d log mel| <= 64 eps (2^-24 is not representable in the
    # difference of logs beyond that).
    tol = 64 * (EPS32 if dtype == torch.float32 else float(np.finfo(np.float64).eps))
    assert (mel_filterbank() > 0).sum(0).max() < 64
    torch.testing.assert_close(streamed, full[:, :T], rtol=0, atol=tol)


def test_stream_step_refuses_per_utterance_and_bad_cache():
    with pytest.raises(RuntimeError, match="per_utterance"):
        LogMelFeatures(normalize="per_utterance").stream_step(torch.zeros(1, 160))
    with pytest.raises(ValueError, match="cache"):
        LogMelFeatures().stream_step(torch.zeros(1, 160), torch.zeros(1, 10))


def test_dither_only_in_training_and_reproducible(speechlike):
    audio, lengths = speechlike
    m = LogMelFeatures()
    ref = LogMelFeatures(dither=0.0).eval()(audio, lengths)[0]
    torch.testing.assert_close(m.eval()(audio, lengths)[0], ref, rtol=0, atol=0)
    m.train()
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a, b = m(audio, lengths, g1)[0], m(audio, lengths, g2)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, ref)
    # The module's own generator: same seed, same dither; consecutive calls differ.
    m1, m2 = LogMelFeatures(seed=11).train(), LogMelFeatures(seed=11).train()
    x1, x2 = m1(audio, lengths)[0], m2(audio, lengths)[0]
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    state = m1.rng_state()
    y1 = m1(audio, lengths)[0]
    assert not torch.equal(y1, x1)
    # Its state round-trips, so a resumed run dithers like an uninterrupted one.
    m3 = LogMelFeatures(seed=99).train()
    m3.set_rng_state(state)
    torch.testing.assert_close(m3(audio, lengths)[0], y1, rtol=0, atol=0)


def test_global_normalisation_and_state_dict(speechlike, tmp_path):
    audio, lengths = speechlike
    raw, fl = LogMelFeatures().eval()(audio, lengths)
    mean, std = torch.linspace(-12, -3, 80), torch.linspace(1, 4, 80)
    m = LogMelFeatures(normalize="global").eval()
    m.set_stats(mean, std)
    feats, _ = m(audio, lengths)
    for b in range(3):
        torch.testing.assert_close(feats[b, :fl[b]], (raw[b, :fl[b]] - mean) / std)
        assert not feats[b, fl[b]:].any()
    sd = m.state_dict()
    assert set(sd) == {"mean", "std"}
    m2 = LogMelFeatures(normalize="global")
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2.eval()(audio, lengths)[0], feats, rtol=0, atol=0)
    with pytest.raises(ValueError, match="std"):
        m.set_stats(mean, torch.zeros(80))
    with pytest.raises(ValueError, match="shape"):
        m.set_stats(mean[:10], std[:10])


def test_per_utterance_normalisation_uses_only_valid_frames(speechlike):
    audio, lengths = speechlike
    m = LogMelFeatures(normalize="per_utterance").eval()
    feats, fl = m(audio, lengths)
    for b in range(3):
        v = feats[b, :fl[b]].double()
        torch.testing.assert_close(v.mean(0), torch.zeros(80, dtype=torch.float64), rtol=0, atol=1e-5)
        # (x - m) / (s + 1e-5) has population std s / (s + 1e-5); s >= ~0.3 here.
        assert ((v.std(0, unbiased=False) - 1).abs() < 1e-4).all()
        alone, _ = m(audio[b:b + 1, :lengths[b]], lengths[b:b + 1])
        torch.testing.assert_close(feats[b, :fl[b]], alone[0, :fl[b]], rtol=1e-5, atol=1e-5)


def test_autocast_does_not_touch_features(speechlike):
    audio, lengths = speechlike
    m = LogMelFeatures().eval()
    ref = m(audio, lengths)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(audio, lengths)[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_reduced_matmul_precision_does_not_reach_the_features(speechlike):
    audio, lengths = speechlike
    m = LogMelFeatures().eval()
    ref = m(audio, lengths)[0]
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 on oneDNN CPUs
        out = m(audio, lengths)[0]
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the call
    finally:
        torch.set_float32_matmul_precision(saved)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    m = LogMelFeatures()
    with pytest.raises(ValueError, match="lengths"):
        m(torch.zeros(2, 1600), torch.tensor([1600, 1600], dtype=torch.int32))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.zeros(2, 1600), torch.tensor([1600]))
    with pytest.raises(ValueError, match="audio"):
        m(torch.zeros(1600), torch.tensor([1600]))
    with pytest.raises(ValueError, match="normalize"):
        LogMelFeatures(normalize="batch")


def test_compute_global_stats_and_cli(tmp_path):
    from streamssl.cli import main
    from streamssl.data.manifest import load_manifest

    manifest, waves = make_corpus(tmp_path, n=5, seed=3, min_s=0.3, max_s=0.8)
    stats = compute_global_stats(load_manifest(manifest), batch_seconds=2.0)
    m = LogMelFeatures().eval()
    frames = []
    for w in waves:
        x = torch.from_numpy(w / np.float32(32768))[None]
        f, fl = m(x, torch.tensor([x.shape[1]]))
        frames.append(f[0, :fl[0]].double())
    allf = torch.cat(frames)
    assert stats["frames"] == allf.shape[0]
    # float32 features, statistics accumulated in float64: only the features' rounding remains.
    np.testing.assert_allclose(stats["mean"], allf.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], allf.std(0, unbiased=False).numpy(), rtol=1e-5)

    out = tmp_path / "stats.json"
    assert main(["compute-stats", manifest, str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["features"]["n_mels"] == 80 and saved["frames"] == stats["frames"]
    g = LogMelFeatures(normalize="global")
    g.load_stats(out)
    torch.testing.assert_close(g.mean, torch.tensor(stats["mean"], dtype=torch.float32))
    with pytest.raises(ValueError, match="hop_length"):
        LogMelFeatures(normalize="global", hop_length=128).load_stats(out)
    save_stats(tmp_path / "s2.json", stats)
    assert load_stats(tmp_path / "s2.json")["mean"].dtype == np.float32
    assert main(["compute-stats", str(tmp_path / "missing.json"), str(out)]) == 1
