import numpy as np
import pytest
import torch

from streamssl.data.augment import KIND_NOISE, KIND_NONE, KIND_SPEECH, NestAugment


def batch(B=16, N=4000, seed=0, with_noise=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(N // 4, N + 1, (B,), generator=g)
    lengths[0] = N
    audio = torch.randn(B, N, generator=g) * torch.rand(B, 1, generator=g)
    audio[torch.arange(N)[None, :] >= lengths[:, None]] = 0
    if not with_noise:
        return audio, lengths, None, None
    noise_lengths = torch.randint(N // 8, N + 1, (B,), generator=g)
    noise = torch.randn(B, N, generator=g) * 3
    noise[torch.arange(N)[None, :] >= noise_lengths[:, None]] = 0
    return audio, lengths, noise, noise_lengths


def run(aug, *args, seed=1):
    return aug(*args, generator=torch.Generator().manual_seed(seed), return_info=True)


def test_snr_over_the_mixed_segment_equals_the_drawn_value():
    audio, lengths, noise, nl = batch(B=64)
    noisy, info = run(NestAugment(), audio, lengths, noise, nl)
    kinds = info["kind"]
    assert (kinds == KIND_NOISE).any() and (kinds == KIND_SPEECH).any() and (kinds == KIND_NONE).any()
    for b in torch.nonzero(kinds != KIND_NONE).flatten().tolist():
        s, n = int(info["seg_start"][b]), int(info["seg_len"][b])
        clean = audio[b, s:s + n].double()
        added = noisy[b, s:s + n].double() - clean
        snr = 10 * torch.log10(clean.square().sum() / added.square().sum())
        # float32 power sums (cascade summation, relative error ~ log2(n) eps ~ 1e-6) and the
        # float32 mixture: a few 1e-5 dB; the issue asks for 0.1 dB.
        assert abs(float(snr) - float(info["snr_db"][b])) < 1e-3


def test_clean_input_untouched_and_outside_segment_identical():
    audio, lengths, noise, nl = batch()
    a0, n0 = audio.clone(), noise.clone()
    noisy, info = run(NestAugment(), audio, lengths, noise, nl)
    assert torch.equal(audio, a0) and torch.equal(noise, n0)
    assert noisy.data_ptr() != audio.data_ptr()
    t = torch.arange(audio.shape[1])[None, :]
    seg = (t >= info["seg_start"][:, None]) & (t < (info["seg_start"] + info["seg_len"])[:, None])
    torch.testing.assert_close(noisy[~seg], audio[~seg], rtol=0, atol=0)
    none = info["kind"] == KIND_NONE
    torch.testing.assert_close(noisy[none], audio[none], rtol=0, atol=0)
    assert not noisy[t.expand_as(noisy) >= lengths[:, None]].any()  # padding stays zero


def test_segment_is_half_the_utterance_and_inside_it():
    audio, lengths, noise, nl = batch(B=64)
    _, info = run(NestAugment(segment_ratio=0.5), audio, lengths, noise, nl)
    mixed = info["kind"] != KIND_NONE
    torch.testing.assert_close(info["seg_len"][mixed], lengths[mixed] // 2, rtol=0, atol=0)
    assert (info["seg_start"][mixed] >= 0).all()
    assert ((info["seg_start"] + info["seg_len"])[mixed] <= lengths[mixed]).all()


def test_interference_is_the_partner_or_the_noise_read_circularly():
    audio, lengths, noise, nl = batch(B=32)
    noisy, info = run(NestAugment(prob=1.0), audio, lengths, noise, nl)
    eps = torch.finfo(torch.float32).eps
    for b in range(32):
        s, n, k = int(info["seg_start"][b]), int(info["seg_len"][b]), int(info["kind"][b])
        scale = float(info["scale"][b])
        if scale == 0:
            continue
        if k == KIND_SPEECH:
            p = int(info["partner"][b])
            assert p != b
            src = audio[p, :lengths[p]].double()
        else:
            assert k == KIND_NOISE
            src = noise[b, :nl[b]].double()
        clean, out = audio[b, s:s + n].double(), noisy[b, s:s + n].double()
        looped = torch.cat([src, src.repeat(n // len(src) + 1)])

        def matches(st, m):
            # float32 rounding: the gain (a sqrt and a division, ~3 eps), the product and the sum.
            want = clean[:m] + scale * looped[st:st + m]
            return ((out[:m] - want).abs() <= 4 * eps * (scale * looped[st:st + m]).abs()
                    + eps * out[:m].abs()).all()

        first = clean[0] + scale * src  # every candidate start at once
        starts = torch.nonzero((out[0] - first).abs() <= 4 * eps * (scale * src).abs() + eps * out[0].abs())
        starts = starts.flatten().tolist()
        assert any(matches(st, n) for st in starts), f"row {b}: not a circular window of its source"


def test_probabilities_and_snr_ranges():
    audio, lengths, noise, nl = batch(B=4000, N=64, seed=3)
    nl = torch.full_like(nl, 64)
    _, info = run(NestAugment(), audio, lengths, noise, nl)
    k, snr = info["kind"], info["snr_db"]
    # Binomial(4000, 0.5) and Binomial(4000, 0.25): 5 sigma bands.
    assert abs((k != KIND_NONE).float().mean() - 0.5) < 5 * 0.5 / np.sqrt(4000)
    assert abs((k == KIND_NOISE).float().mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 4000)
    sn, ss = snr[k == KIND_NOISE], snr[k == KIND_SPEECH]
    assert sn.min() >= -5 and sn.max() <= 20 and sn.min() < -4.5 and sn.max() > 19.5
    assert ss.min() >= -5 and ss.max() <= 5 and ss.min() < -4.8 and ss.max() > 4.8
    partners = info["partner"][k == KIND_SPEECH]
    assert (partners >= 0).all() and (partners != torch.nonzero(k == KIND_SPEECH).flatten()).all()


def test_reproducible_from_the_generator():
    args = batch()
    a, ia = run(NestAugment(), *args, seed=5)
    b, ib = run(NestAugment(), *args, seed=5)
    c, _ = run(NestAugment(), *args, seed=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(ia[key], ib[key]) for key in ia)
    assert not torch.equal(a, c)


def test_without_noise_only_speech_is_mixed_and_a_single_utterance_stays_clean():
    audio, lengths, _, _ = batch(with_noise=False)
    _, info = run(NestAugment(prob=1.0), audio, lengths)
    assert (info["kind"] == KIND_SPEECH).all()
    one = audio[:1]
    out, info = run(NestAugment(prob=1.0), one, lengths[:1])
    assert torch.equal(out, one) and info["kind"].tolist() == [KIND_NONE]


def test_missing_noise_crop_falls_back_to_speech():
    audio, lengths, noise, nl = batch()
    nl = torch.zeros_like(nl)
    _, info = run(NestAugment(prob=1.0, noise_prob=1.0), audio, lengths, noise, nl)
    assert (info["kind"] == KIND_SPEECH).all()


def test_bfloat16_audio_keeps_dtype():
    audio, lengths, noise, nl = batch()
    out = NestAugment(prob=1.0)(audio.bfloat16(), lengths, noise.bfloat16(), nl,
                                generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == audio.shape


def test_bad_inputs_name_the_argument():
    audio, lengths, noise, nl = batch()
    aug = NestAugment()
    with pytest.raises(ValueError, match="lengths"):
        aug(audio, lengths.int())
    with pytest.raises(ValueError, match="noise"):
        aug(audio, lengths, noise)
    with pytest.raises(ValueError, match="noise"):
        aug(audio, lengths, noise[:3], nl[:3])
    with pytest.raises(ValueError, match="prob"):
        NestAugment(prob=1.5)
    with pytest.raises(ValueError, match="noise_snr"):
        NestAugment(noise_snr=(20, -5))
    with pytest.raises(ValueError, match="segment_ratio"):
        NestAugment(segment_ratio=0.0)
