"""FastConformerEncoder (full-utterance pass): shapes, padding, causality, latency, training, errors."""

import copy
import io
import math

import pytest
import torch

from streamssl.nn import (
    PRESETS,
    CausalStridingSubsampling,
    FastConformerEncoder,
    RelPositionMultiHeadAttention,
    build_encoder,
    context_mask,
    encoder_config,
    rel_position_sinusoid,
)
from streamssl.nn.attention import rel_shift

F_IN = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(feat_in=F_IN, d_model=32, n_layers=3, n_heads=4, conv_kernel_size=5, subsampling_channels=16, dropout=0.0)
    args.update(kw)
    return FastConformerEncoder(**args)


# ---- attention pieces ----------------------------------------------------------------------------


def test_rel_shift_picks_each_pairs_distance():
    # x[a, c] encodes the distance of column c; after the shift, entry (a, b) must hold the distance
    # of query a and key b for queries starting at q0 and keys at k0.
    for n_q, n_k, q0, k0 in [(5, 5, 0, 0), (3, 7, 4, 0), (4, 2, 9, 8), (1, 6, 5, 0)]:
        d_max = q0 + n_q - 1 - k0
        dist = torch.arange(d_max, d_max - (n_q + n_k - 1), -1).float()
        x = dist.expand(2, n_q, n_q + n_k - 1)
        want = (torch.arange(q0, q0 + n_q)[:, None] - torch.arange(k0, k0 + n_k)[None, :]).float()
        assert torch.equal(rel_shift(x, n_k)[0], want)


def test_rel_position_sinusoid_rows_depend_only_on_distance():
    a = rel_position_sinusoid(10, 21, 12)  # distances 10 ... -10
    b = rel_position_sinusoid(3, 4, 12)  # distances 3 ... 0
    assert torch.equal(a[7:11], b)
    assert torch.allclose(a[10], torch.tensor([0.0, 1.0] * 6))  # d = 0: sin 0, cos 0


def test_attention_matches_direct_formula():
    torch.manual_seed(0)
    att = RelPositionMultiHeadAttention(12, 3).double()
    T = 6
    x = torch.randn(2, T, 12, dtype=torch.float64)
    allowed = context_mask(0, T, 0, T, (2, 1), "regular")
    pos = rel_position_sinusoid(T - 1, 2 * T - 1, 12, dtype=torch.float64)
    y = att(x, allowed, pos)
    q = att.linear_q(x).view(2, T, 3, 4)
    k = att.linear_k(x).view(2, T, 3, 4)
    v = att.linear_v(x).view(2, T, 3, 4)
    p = att.linear_pos(pos).view(2 * T - 1, 3, 4)
    want = torch.zeros(2, T, 3, 4, dtype=torch.float64)
    for i in range(T):
        s = torch.full((2, 3, T), -math.inf, dtype=torch.float64)
        for j in range(T):
            if allowed[i, j]:
                r = (T - 1) - (i - j)  # row of distance i - j
                s[:, :, j] = ((q[:, i] + att.pos_bias_u) * k[:, j]).sum(-1) + ((q[:, i] + att.pos_bias_v) * p[r]).sum(-1)
        w = torch.softmax(s / 2.0, dim=-1)  # sqrt(d_head = 4)
        want[:, i] = torch.einsum("bhj,bjhd->bhd", w, v)
    torch.testing.assert_close(y, att.linear_out(want.reshape(2, T, 12)), rtol=1e-12, atol=1e-12)


def test_context_masks_follow_the_rule():
    m = context_mask(0, 8, 0, 8, (4, 1), "chunked_limited")  # chunks of 2, two chunks back
    for i in range(8):
        for j in range(8):
            assert bool(m[i, j]) == (j // 2 <= i // 2 and i // 2 - j // 2 <= 2)
    m = context_mask(3, 4, 0, 9, (2, 1), "regular")  # offsets: absolute positions
    for a in range(4):
        for b in range(9):
            assert bool(m[a, b]) == (3 + a - 2 <= b <= 3 + a + 1)
    assert bool(context_mask(0, 5, 0, 5, (-1, -1), "regular").all())


# ---- subsampling -------------------------------------------------------------------------------


def _dependencies(fn, T, probe_frames, seed=0):
    """dep[t, i]: output frame t of fn changes when input frame probe_frames[i] is replaced."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, T, F_IN, generator=gen)
    batch = base.repeat(len(probe_frames) + 1, 1, 1)
    for i, f in enumerate(probe_frames):
        batch[i + 1, f] = 3.0 * torch.randn(F_IN, generator=gen)
    with torch.no_grad():
        out = fn(batch, torch.full((batch.shape[0],), T))
    # A real dependence moves outputs by O(0.01..1); rows of one batched matmul may differ by
    # float32 rounding (~1e-6) only, so 1e-4 separates the two.
    return ((out[1:] - out[:1]).abs().amax(-1) > 1e-4).T  # (T', n_probe)


@pytest.mark.parametrize("T", [1, 7, 8, 9, 63, 64, 65])
def test_subsampling_lengths_and_receptive_field(T):
    torch.manual_seed(1)
    sub = CausalStridingSubsampling(F_IN, 24, factor=8, channels=16)
    lengths = torch.tensor([T, max(T - 5, 0), 1])
    out, out_len = sub(torch.randn(3, T, F_IN), lengths)
    assert out.shape == (3, math.ceil(T / 8), 24)
    assert out_len.tolist() == [math.ceil(n / 8) for n in lengths.tolist()]
    if T >= 64:  # frame t reads exactly feature frames 8t - 7 ... 8t + 7
        dep = _dependencies(lambda x, n: sub(x, n)[0], T, list(range(T)))
        for t in range(dep.shape[0]):
            want = [8 * t - 7 <= f <= 8 * t + 7 for f in range(T)]
            assert dep[t].tolist() == want, t


# ---- encoder -----------------------------------------------------------------------------------


def test_output_shapes_lengths_and_zeroed_padding():
    enc = tiny().eval()
    lengths = torch.tensor([61, 1, 8, 0, 33])
    out, out_len = enc(torch.randn(5, 61, F_IN), lengths)
    assert out.shape == (5, 8, 32)  # ceil(61 / 8)
    assert out_len.tolist() == [8, 1, 1, 0, 5]  # ceil(lengths / 8)
    assert out_len.dtype == torch.int64
    for b, n in enumerate(out_len.tolist()):
        assert torch.all(out[b, n:] == 0)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("ctx,style", [((-1, 0), "chunked_limited"), ((8, 1), "regular"), ((4, 3), "chunked_limited")])
def test_batch_padding_invariance(ctx, style):
    enc = tiny(att_context_size=ctx, att_context_style=style).eval()
    gen = torch.Generator().manual_seed(2)
    lengths = [77, 20, 5, 64]
    T = 90
    feats = 100.0 * torch.randn(len(lengths), T, F_IN, generator=gen)  # garbage everywhere...
    for b, n in enumerate(lengths):
        feats[b, :n] = torch.randn(n, F_IN, generator=gen)  # ...except the valid frames
    with torch.no_grad():
        out, out_len = enc(feats, torch.tensor(lengths))
        for b, n in enumerate(lengths):
            alone, alone_len = enc(feats[b : b + 1, :n], torch.tensor([n]))
            m = alone_len.item()
            # Different batch shapes change only float32 summation order (~1e-6 after the LayerNorms).
            torch.testing.assert_close(out[b, :m], alone[0], rtol=1e-5, atol=1e-5)
            assert torch.all(out[b, m:] == 0)


def _group_probes(T):
    return [f for g in range(T // 8) for f in (8 * g, 8 * g + 7)]


@pytest.mark.parametrize("ctx", [(-1, 0), (4, 0)])
@pytest.mark.parametrize("style", ["chunked_limited", "regular"])
def test_causal_for_zero_right_context(ctx, style):
    enc = tiny(att_context_size=ctx, att_context_style=style).eval()
    T = 96
    probes = _group_probes(T)
    dep = _dependencies(lambda x, n: enc(x, n)[0], T, probes)
    for t in range(T // 8):
        last = max(f for f, d in zip(probes, dep[t].tolist()) if d)
        assert last == 8 * t + 7  # its own group's last frame, and nothing later


@pytest.mark.parametrize(
    "ctx,style,right_frames",
    [((8, 1), "chunked_limited", 1), ((12, 3), "chunked_limited", 3), ((8, 1), "regular", 3), ((2, 2), "regular", 6)],
)
def test_lookahead_ms_is_the_measured_lookahead(ctx, style, right_frames):
    # right_frames: hand-derived lookahead in encoder frames (regular: n_layers (3) * right).
    # Short left contexts keep every attention hop strong (weights ~1 / keys), so the farthest
    # dependence, a chain of n_layers hops, stays far above the detection threshold.
    enc = tiny(att_context_size=ctx, att_context_style=style).eval()
    assert enc.lookahead_ms() == right_frames * 80.0
    T = 8 * 24
    probes = _group_probes(T)
    dep = _dependencies(lambda x, n: enc(x, n)[0], T, probes)
    worst = 0
    for t in range(T // 8 - right_frames):  # frames whose lookahead lies inside the utterance
        last = max(f for f, d in zip(probes, dep[t].tolist()) if d)
        worst = max(worst, last - (8 * t + 7))
    assert worst * 10.0 == enc.lookahead_ms()


def test_latency_figures_for_the_three_variants():
    small = dict(PRESETS["small"])  # 16 layers
    fully_causal = FastConformerEncoder(**small, att_context_size=(-1, 0))
    assert (fully_causal.chunk_ms(), fully_causal.lookahead_ms(), fully_causal.latency_ms()) == (80.0, 0.0, 70.0)
    assert fully_causal.stream_chunk_frames() == 8
    # Limited lookahead, chunked: chunk of R + 1 = 4 frames (320 ms); the first frame of a chunk
    # waits for 3 more (240 ms); its first feature frame waits 7 more frames of its own group too.
    lookahead = FastConformerEncoder(**small, att_context_size=(-1, 3))
    assert (lookahead.chunk_ms(), lookahead.lookahead_ms(), lookahead.latency_ms()) == (320.0, 240.0, 310.0)
    assert lookahead.stream_chunk_frames() == 32
    # The same right context with the regular style looks 1 frame ahead in each of 16 layers.
    regular = FastConformerEncoder(**small, att_context_size=(-1, 1), att_context_style="regular")
    assert (regular.chunk_ms(), regular.lookahead_ms(), regular.latency_ms()) == (80.0, 1280.0, 1350.0)
    # Limited left context changes cost and memory, not latency.
    limited_left = FastConformerEncoder(**small, att_context_size=(64, 0))
    assert (limited_left.chunk_ms(), limited_left.lookahead_ms(), limited_left.latency_ms()) == (80.0, 0.0, 70.0)
    offline = FastConformerEncoder(**small, att_context_size=(-1, -1), att_context_style="regular")
    assert offline.lookahead_ms() == math.inf
    with pytest.raises(ValueError, match="cannot stream"):
        offline.stream_chunk_frames()


def test_gradients_reach_every_parameter_and_training_reduces_a_loss():
    enc = tiny(dropout=0.1, att_context_size=[(-1, 0), (4, 1)]).train()
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 70, F_IN, generator=gen)
    lengths = torch.tensor([70, 41, 12])
    target = torch.randn(3, 9, 32, generator=gen)
    out, out_len = enc(feats, lengths)
    valid = (torch.arange(9) < out_len[:, None]).unsqueeze(-1)
    ((out - target) ** 2 * valid).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    enc = tiny(dropout=0.0)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)

    def loss_fn():
        out, _ = enc(feats, lengths)
        return ((out - target) ** 2 * valid).sum() / valid.sum()

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first


def test_multi_latency_draws_are_reproducible_and_used():
    ctxs = [(-1, 0), (4, 1), (8, 3)]
    a, b = tiny(att_context_size=ctxs, att_context_seed=7), tiny(att_context_size=ctxs, att_context_seed=7)
    seq = [a.draw_att_context_size() for _ in range(30)]
    assert seq == [b.draw_att_context_size() for _ in range(30)]
    assert set(seq) == set(ctxs)
    c = tiny(att_context_size=ctxs, att_context_seed=8)
    assert [c.draw_att_context_size() for _ in range(30)] != seq
    # The draw count travels in the state dict: a restored copy continues the sequence.
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    d = tiny(att_context_size=ctxs, att_context_seed=7)
    d.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert [d.draw_att_context_size() for _ in range(5)] == [a.draw_att_context_size() for _ in range(5)]
    # A training forward uses the drawn context (dropout 0: train and eval compute the same function).
    e = tiny(att_context_size=ctxs, att_context_seed=7).train()
    probe = copy.deepcopy(e)
    feats, lengths = torch.randn(2, 64, F_IN), torch.tensor([64, 50])
    for _ in range(4):
        want_ctx = probe.draw_att_context_size()
        with torch.no_grad():
            got = e(feats, lengths)[0]
            want = e(feats, lengths, att_context_size=want_ctx)[0]
        assert torch.equal(got, want)
    # Eval uses the default (first) context, or the chosen one.
    e.eval()
    assert e.att_context_size == (-1, 0)
    e.set_default_att_context_size((8, 3))
    assert e.att_context_size == (8, 3) and e.stream_chunk_frames() == 32


def test_forward_never_reads_tensor_values_on_the_host():
    # On the meta device a tensor has no data: any .item(), bool(), .tolist() or data-dependent
    # shape in the forward would raise. This is the CPU stand-in for "no host sync on the GPU".
    enc = tiny(att_context_size=[(-1, 0), (4, 1)]).train().to("meta")
    out, out_len = enc(torch.randn(3, 50, F_IN, device="meta"), torch.tensor([50, 3, 20], device="meta"))
    assert out.shape == (3, 7, 32) and out_len.shape == (3,)
    out.sum().backward()


def test_no_batch_statistics_anywhere():
    # BatchNorm makes outputs depend on the batch and breaks streaming; the encoder has none.
    for name in ("demo", "small"):
        enc = build_encoder({"preset": name})
        assert not [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]


def test_presets_and_config_overrides():
    assert encoder_config({"preset": "small"})["d_model"] == 176
    assert PRESETS["large"]["d_model"] == 512 and PRESETS["large"]["n_layers"] == 17 and PRESETS["large"]["n_heads"] == 8
    assert all(p["conv_kernel_size"] == 9 and p["subsampling_factor"] == 8 for p in PRESETS.values())
    enc = build_encoder({"preset": "demo", "n_layers": 2}, att_context_size=[[-1, 0], [16, 1]])
    assert enc.n_layers == 2 and enc.att_context_sizes == [(-1, 0), (16, 1)] and enc.d_model == PRESETS["demo"]["d_model"]
    with pytest.raises(ValueError, match="preset"):
        encoder_config({"preset": "huge"})
    with pytest.raises(ValueError, match="d_modle"):
        encoder_config({"preset": "demo", "d_modle": 3})


def test_bad_inputs_name_the_argument():
    enc = tiny().eval()
    with pytest.raises(ValueError, match="feats must have shape"):
        enc(torch.randn(2, 40, F_IN + 1), torch.tensor([40, 40]))
    with pytest.raises(ValueError, match="feats must have shape"):
        enc(torch.randn(40, F_IN), torch.tensor([40]))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 40\]"):
        enc(torch.randn(2, 40, F_IN), torch.tensor([41, 3]))
    with pytest.raises(ValueError, match=r"lengths must be in"):
        enc(torch.randn(2, 40, F_IN), torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="lengths must be a"):
        enc(torch.randn(2, 40, F_IN), torch.tensor([40]))
    with pytest.raises(ValueError, match="lengths must be an integer"):
        enc(torch.randn(2, 40, F_IN), torch.tensor([40.0, 3.0]))
    with pytest.raises(ValueError, match="multiple of the chunk"):
        tiny(att_context_size=(6, 3))
    with pytest.raises(ValueError, match="att_context_style"):
        tiny(att_context_style="chunked")
    with pytest.raises(ValueError, match="att_context_size"):
        tiny(att_context_size=(-2, 0))
    with pytest.raises(ValueError, match="att_context_size"):
        enc(torch.randn(1, 8, F_IN), torch.tensor([8]), att_context_size=(1, 2, 3))
    with pytest.raises(ValueError, match="subsampling_factor"):
        tiny(subsampling_factor=6)
    with pytest.raises(ValueError, match="n_heads"):
        tiny(n_heads=5)


def _nchw_subsampling(m, feats, lengths):
    """The subsampling as plain NCHW modules: masked_fill, F.pad, conv, ReLU per stage."""
    import torch.nn.functional as F

    from streamssl.nn.subsampling import _CACHE

    x, lens = feats.unsqueeze(1), lengths.clone()
    for s in range(len(m.convs)):
        valid = torch.arange(x.shape[2]) < lens.unsqueeze(1)
        x = F.pad(x.masked_fill(~valid[:, None, :, None], 0.0), (0, 0, _CACHE, 1)).contiguous()
        c = m.convs[s]
        x = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, groups=c.groups).contiguous()
        x = F.relu(m.pointwise[s](x).contiguous())
        lens = (lens + 1) // 2
    return m._project(x)


def test_subsampling_layout_change_keeps_the_nchw_result():
    """The channels_last stages (conv-padded time, masked ReLU with its own backward) compute what
    plain NCHW convolutions compute: float32 within summation-order tolerance, float64 outputs and
    every gradient (input and weights) to 1e-12."""
    from streamssl.nn.subsampling import CausalStridingSubsampling

    torch.manual_seed(0)
    m = CausalStridingSubsampling(80, 64, 8, 32)
    feats, lengths = torch.randn(3, 101, 80), torch.tensor([101, 64, 9])
    y, _ = m(feats, lengths)
    # Only the summation order differs: each output sums a few hundred float32 products of O(1)
    # values over three stages, so differences stay within a few hundred ulps of 1 (~1e-5).
    assert torch.allclose(y, _nchw_subsampling(m, feats, lengths), atol=1e-5, rtol=1e-5)

    m64, f64 = m.double(), feats.double()
    grads = []
    for fn in (lambda x: m64(x, lengths)[0], lambda x: _nchw_subsampling(m64, x, lengths)):
        x = f64.clone().requires_grad_()
        out = fn(x)
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        out_lengths = m64.output_lengths(lengths)
        g = g * (torch.arange(out.shape[1]) < out_lengths[:, None])[..., None]  # valid frames only
        grads.append((out * (g != 0), torch.autograd.grad(out, [x, *m64.parameters()], g)))
    (o1, g1), (o2, g2) = grads
    # float64, unit roundoff u = 1.1e-16: the longest sums here (a first-stage weight gradient over
    # 3 x 51 x 40 = 6120 positions) can move with summation order by at most n u = 7e-13 of their
    # terms' magnitude, which is O(1); a wrong mask or backward moves entries by O(1).
    torch.testing.assert_close(o1, o2, atol=1e-12, rtol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    m.float()

    # Whatever a caller's padding holds, valid frames see zeros there (the later stages' padding is
    # zeroed by a multiply, which relies on the first stage's select).
    dirty = feats.clone()
    dirty[1, 64:], dirty[2, 9:] = float("nan"), float("inf")
    y2, out_lengths = m(dirty, lengths)
    for b, n in enumerate(out_lengths.tolist()):
        assert torch.equal(y2[b, :n], y[b, :n])
