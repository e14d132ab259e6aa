"""Streaming: chunk-by-chunk stream_step output equals the full-utterance forward, row by row."""

import math

import pytest
import torch

from streamssl.nn import FastConformerEncoder

F_IN = 16
N_LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(ctx, style, seed=0):
    torch.manual_seed(seed)
    return FastConformerEncoder(
        feat_in=F_IN, d_model=32, n_layers=N_LAYERS, n_heads=4, conv_kernel_size=5, subsampling_channels=8,
        att_context_size=ctx, att_context_style=style, dropout=0.1,
    ).eval()


def batch(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    feats = 50.0 * torch.randn(len(lengths), T, F_IN, generator=gen)  # padding holds garbage
    for b, n in enumerate(lengths):
        feats[b, :n] = torch.randn(n, F_IN, generator=gen)
    return feats, torch.tensor(lengths)


def stream_by_hand(enc, feats, lengths):
    """Feed chunks; a row ends with its first chunk shorter than the step (an all-padding chunk with
    chunk_lengths 0 when its length is a multiple of the step). Returns per-row frame lists and, per
    row, the step in which it got its last frame and the step in which it ended."""
    B, T, _ = feats.shape
    step = enc.stream_chunk_frames()
    n_steps = T // step + 1  # enough for every row to see a short chunk
    feats = torch.nn.functional.pad(feats, (0, 0, 0, n_steps * step - T))
    state = enc.init_stream_state(B)
    frames = [[] for _ in range(B)]
    last_frame_step, end_step = [None] * B, [None] * B
    with torch.no_grad():
        for s in range(n_steps):
            cl = (lengths - s * step).clamp(0, step)
            y, yl, state = enc.stream_step(feats[:, s * step : (s + 1) * step], cl, state)
            assert y.shape[0] == B and yl.shape == (B,)
            for b, n in enumerate(yl.tolist()):
                assert torch.all(y[b, n:] == 0)
                frames[b].extend(y[b, :n])
                if n:
                    last_frame_step[b] = s
                if end_step[b] is None and cl[b] < step:
                    end_step[b] = s
    return frames, last_frame_step, end_step


CONTEXTS = [
    ((-1, 0), "chunked_limited"),
    ((-1, 0), "regular"),
    ((16, 0), "chunked_limited"),
    ((16, 0), "regular"),
    ((8, 1), "chunked_limited"),
    ((8, 1), "regular"),
    ((12, 3), "chunked_limited"),
    ((12, 3), "regular"),
]


@pytest.mark.parametrize("lengths", [[183], [5], [203, 1, 150, 20, 64]], ids=["B1", "B1-short", "B5-ragged"])
@pytest.mark.parametrize("ctx,style", CONTEXTS)
def test_streaming_equals_offline(ctx, style, lengths):
    enc = tiny(ctx, style)
    feats, lens = batch(lengths)
    with torch.no_grad():
        off, off_len = enc(feats, lens)
    frames, last_frame_step, end_step = stream_by_hand(enc, feats, lens)
    for b in range(len(lengths)):
        n = off_len[b].item()
        assert len(frames[b]) == n == math.ceil(lengths[b] / 8)
        if n:
            # float32: the same per-frame arithmetic in different matrix shapes and softmax widths;
            # rounding differences (~1e-7 per op) stay far below 1e-5 after each LayerNorm.
            torch.testing.assert_close(torch.stack(frames[b]), off[b, :n], rtol=0, atol=1e-5)
            # A row's remaining frames come out at the latest in the step where it ends.
            assert last_frame_step[b] <= end_step[b]


@pytest.mark.parametrize("ctx,style", [((8, 1), "chunked_limited"), ((8, 1), "regular"), ((-1, 2), "regular")])
def test_frames_come_out_as_soon_as_their_context_has_arrived(ctx, style):
    enc = tiny(ctx, style)
    feats, lens = batch([400, 400])
    step = enc.stream_chunk_frames()
    delay = N_LAYERS * ctx[1] if style == "regular" else 0  # encoder frames of accumulated lookahead
    state, total = enc.init_stream_state(2), 0
    with torch.no_grad():
        for s in range(1, 400 // step):
            _, yl, state = enc.stream_step(feats[:, (s - 1) * step : s * step], torch.full((2,), step), state)
            total += yl[0].item()
            assert yl[0] == yl[1]
            # After s steps, s * step / 8 encoder frames have their inputs; each needs `delay` more.
            assert total == max(0, s * step // 8 - delay)


@pytest.mark.parametrize("ctx,style", [((8, 1), "chunked_limited"), ((4, 2), "regular")])
def test_multi_chunk_steps_and_forward_streaming(ctx, style):
    enc = tiny(ctx, style)
    feats, lens = batch([150, 67, 9])
    with torch.no_grad():
        off, off_len = enc(feats, lens)
    for k in (1, 3):
        out, out_len = enc.forward_streaming(feats, lens, chunks_per_step=k)
        assert torch.equal(out_len, off_len) and out.shape == off.shape
        torch.testing.assert_close(out, off, rtol=0, atol=1e-5)  # zero padding included


def test_limited_left_context_bounds_the_cache():
    left = 8
    enc = tiny((left, 1), "chunked_limited")
    feats, lens = batch([320])
    step = enc.stream_chunk_frames()
    state = enc.init_stream_state(1)
    with torch.no_grad():
        for s in range(320 // step):
            _, _, state = enc.stream_step(feats[:, s * step : (s + 1) * step], torch.tensor([step]), state)
            for layer in state.layers:
                assert layer.k.shape[2] <= left and layer.v.shape == layer.k.shape
    assert state.layers[0].k.shape[2] == left  # and it is full: the bound is reached, not undershot


def test_stream_step_leaves_its_input_state_alone():
    enc = tiny((4, 1), "regular")
    feats, _ = batch([48, 48])
    state = enc.init_stream_state(2)
    with torch.no_grad():
        _, _, s1 = enc.stream_step(feats[:, :8], torch.tensor([8, 8]), state)
        snapshot = [(l.k.clone(), l.pending.clone(), l.conv_cache.clone()) for l in s1.layers]
        y_a, l_a, _ = enc.stream_step(feats[:, 8:16], torch.tensor([8, 3]), s1)
        y_b, l_b, _ = enc.stream_step(feats[:, 8:16], torch.tensor([8, 3]), s1)
    assert torch.equal(y_a, y_b) and torch.equal(l_a, l_b)
    for layer, (k, p, c) in zip(s1.layers, snapshot):
        assert torch.equal(layer.k, k) and torch.equal(layer.pending, p) and torch.equal(layer.conv_cache, c)


def test_streaming_bad_inputs_name_the_argument():
    enc = tiny((8, 1), "chunked_limited")  # streams 16 feature frames per step
    state = enc.init_stream_state(2)
    good = torch.randn(2, 16, F_IN)
    with pytest.raises(ValueError, match=r"chunk has 12 frames .* stream_chunk_frames\(\) = 16"):
        enc.stream_step(torch.randn(2, 12, F_IN), torch.tensor([12, 12]), state)
    with pytest.raises(ValueError, match="chunk must have shape"):
        enc.stream_step(torch.randn(2, 16, F_IN + 2), torch.tensor([16, 16]), state)
    with pytest.raises(ValueError, match="state was built for batch size 2"):
        enc.stream_step(torch.randn(3, 16, F_IN), torch.tensor([16, 16, 16]), state)
    with pytest.raises(ValueError, match=r"chunk_lengths must be in \[0, 16\]"):
        enc.stream_step(good, torch.tensor([17, 16]), state)
    with pytest.raises(ValueError, match="chunk_lengths must be a"):
        enc.stream_step(good, torch.tensor([16]), state)
    _, _, ended = enc.stream_step(good, torch.tensor([16, 5]), state)  # row 1 ends
    with pytest.raises(ValueError, match="chunk_lengths must be 0 for rows that already ended"):
        enc.stream_step(good, torch.tensor([16, 16]), ended)
    with pytest.raises(ValueError, match="state must come from"):
        enc.stream_step(good, torch.tensor([16, 16]), {"k": None})
    with pytest.raises(ValueError, match="batch_size"):
        enc.init_stream_state(0)
    enc.set_default_att_context_size((-1, 0))
    with pytest.raises(ValueError, match=r"state was built for att_context_size=\[8, 1\]"):
        enc.stream_step(torch.randn(2, 8, F_IN), torch.tensor([8, 8]), state)
    enc.train()
    with pytest.raises(RuntimeError, match="eval"):
        enc.stream_step(torch.randn(2, 8, F_IN), torch.tensor([8, 8]), enc.init_stream_state(2))
