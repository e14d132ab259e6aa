"""NEST model wiring: which frames are scored and which tokens they are scored against."""

import torch

from streamssl.config import load_config
from streamssl.ssl.nest import NEST


def _model(**over):
    cfg = load_config("demo", ["model.encoder.d_model=32", "model.encoder.n_layers=1", "model.encoder.n_heads=2",
                               "model.encoder.subsampling_channels=8", "model.quantizer.num_codes=64",
                               "model.masking.mask_prob=0.05", "model.objective.kind=masked"]
                       + [f"{k}={v}" for k, v in over.items()])
    return NEST(cfg.model, seed=3)


def test_targets_are_the_clean_tokens_of_the_scored_frames():
    torch.manual_seed(0)
    model = _model().eval()  # eval: no augmentation or dither, fixed masks
    audio = torch.randn(3, 16000 * 3) * 0.1
    lengths = torch.tensor([48000, 30011, 9000])
    out = model(audio, lengths)
    # Independently: clean per-utterance features -> tokens of 8-frame stacks; mask -> scored frames.
    clean, feat_len = model.target_features(audio, lengths)
    tokens, _ = model.quantizer(clean, feat_len)
    feats, _ = model.features(audio, lengths)
    _, mask = model.masking(feats, feat_len)
    B, Tq, _ = tokens.shape
    expected_pos = torch.zeros(B, Tq, dtype=torch.bool)
    for b in range(B):
        for j in range(int(feat_len[b]) // 8):
            expected_pos[b, j] = int(mask[b, 8 * j : 8 * j + 8].sum()) >= 7  # >= 80 % of 8 frames
    assert expected_pos.any()
    assert int(out["num_targets"]) == int(expected_pos.sum())
    assert torch.equal(out["targets"], tokens[expected_pos])
    assert out["predictions"].shape == out["targets"].shape


def test_augmentation_changes_inputs_not_targets():
    torch.manual_seed(1)
    model = _model(**{"model.augment.prob": 1.0, "model.encoder.dropout": 0.0, "model.features.dither": 0.0}).train()
    audio = torch.randn(4, 16000 * 2) * 0.1
    lengths = torch.full((4,), 32000)
    noise = torch.randn(4, 16000 * 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    model.masking.calls = 0
    a = model(audio, lengths, noise, lengths.clone(), generator=g1)
    model.masking.calls = 0  # same masks, different augmentation draws
    b = model(audio, lengths, noise, lengths.clone(), generator=g2)
    assert torch.equal(a["targets"], b["targets"])  # targets come from the clean audio
    assert not torch.equal(a["loss"], b["loss"])  # the encoder saw different noisy inputs
