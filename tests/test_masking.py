"""streamssl.ssl.masking: BlockMasking (counter, resume, ranks, embedding) and encoder targets."""

from __future__ import annotations

import io
import math

import pytest
import torch

from streamssl.ops import causal_block_mask
from streamssl.ssl.masking import EVAL_OFFSET, BlockMasking, encoder_target_mask

P = dict(mask_prob=0.05, block_size=12, min_start=4, left_context=64, max_mask_ratio=0.6, align=2)


def batch(B=3, T=200, F=6, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, F, generator=g).to(device), torch.tensor([T, T - 37, T // 2][:B]).to(device)


def test_forward_is_the_op_with_the_counter_as_offset():
    m = BlockMasking(6, seed=11, rank=0, **P)
    feats, lengths = batch()
    outs = [m(feats, lengths) for _ in range(3)]
    assert m.calls == 3
    for k, (masked, mask) in enumerate(outs):
        ref = causal_block_mask(feats, lengths, m.mask_embedding, 11, k, **P)
        assert torch.equal(mask, ref[1]) and torch.equal(masked, ref[0])
        assert mask.any()
    assert not torch.equal(outs[0][1], outs[1][1]) and not torch.equal(outs[1][1], outs[2][1])
    # An explicit offset leaves the counter alone.
    assert torch.equal(m(feats, lengths, offset=1)[1], outs[1][1]) and m.calls == 3


def test_resume_is_exact_through_the_state_dict():
    feats, lengths = batch()
    a = BlockMasking(6, seed=5, rank=0, **P)
    for _ in range(4):
        a(feats, lengths)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = BlockMasking(6, seed=5, rank=0, **P)
    b.load_state_dict(state)
    assert b.calls == 4
    for _ in range(2):
        ma, mb = a(feats, lengths), b(feats, lengths)
        assert torch.equal(ma[1], mb[1]) and torch.equal(ma[0], mb[0])
    with pytest.raises(ValueError, match="extra state"):
        b.set_extra_state({"offset": 1})


def test_eval_mode_uses_a_fixed_offset_and_keeps_the_counter():
    feats, lengths = batch()
    m = BlockMasking(6, seed=3, rank=0, **P)
    m(feats, lengths)
    m.eval()
    e1, e2 = m(feats, lengths), m(feats, lengths)
    assert m.calls == 1 and torch.equal(e1[1], e2[1])
    assert torch.equal(e1[1], causal_block_mask(feats, lengths, m.mask_embedding, 3, EVAL_OFFSET, **P)[1])
    m.train()
    assert torch.equal(m(feats, lengths)[1], causal_block_mask(feats, lengths, m.mask_embedding, 3, 1, **P)[1])


def test_ranks_draw_different_masks():
    feats, lengths = batch(T=400)
    masks = []
    for rank in range(4):
        m = BlockMasking(6, seed=2**32 - 1, rank=rank, **P)
        assert m.rank_seed() == (2**32 - 1 + rank * 2**32) % 2**64
        masks.append(m(feats, lengths)[1])
    assert len({mk.numpy().tobytes() for mk in masks}) == 4
    # Without a process group the rank is 0.
    assert BlockMasking(6, seed=2**32 - 1, **P)(feats, lengths)[1].equal(masks[0])


def test_frozen_embedding_is_a_buffer_with_the_asked_scale():
    m = BlockMasking(4096, seed=1)
    assert "mask_embedding" in dict(m.named_buffers()) and not list(m.parameters())
    assert not m.mask_embedding.requires_grad and "mask_embedding" in m.state_dict()
    # Sample std of n = 4096 N(0, 0.1^2) draws: standard error 0.1 / sqrt(2n) = 0.0011; 5 of them.
    assert abs(float(m.mask_embedding.std()) - 0.1) < 5 * 0.1 / math.sqrt(2 * 4096)
    assert abs(float(m.mask_embedding.mean())) < 5 * 0.1 / math.sqrt(4096)
    assert torch.equal(m.mask_embedding, BlockMasking(4096, seed=1).mask_embedding)
    assert not torch.equal(m.mask_embedding, BlockMasking(4096, seed=2).mask_embedding)


def test_learnable_embedding_gets_the_gradient_of_masked_frames():
    m = BlockMasking(6, seed=4, learnable=True, rank=0, **P)
    assert [n for n, _ in m.named_parameters()] == ["mask_embedding"]
    feats, lengths = batch()
    feats = feats.to(torch.bfloat16).requires_grad_(True)  # the float32 parameter is cast
    masked, mask = m(feats, lengths)
    assert masked.dtype == torch.bfloat16
    grad = torch.randn(masked.shape).to(torch.bfloat16)
    masked.backward(grad)
    keep = mask.unsqueeze(-1)
    assert m.mask_embedding.grad.dtype == torch.float32
    # The backward sums n = B*T bf16 terms accumulating in float32 and rounds once to bf16
    # (relative 2^-8; rtol 2^-7); the float32 reference may add in another order, which differs
    # by at most n * 2^-24 * sum|terms| on a cancelling sum (atol).
    terms = torch.where(keep, grad, 0).float()
    expected = terms.sum((0, 1))
    atol = mask.numel() * 2**-24 * float(terms.abs().sum((0, 1)).max())
    torch.testing.assert_close(m.mask_embedding.grad, expected, rtol=2**-7, atol=atol)
    assert torch.equal(feats.grad, torch.where(keep, 0, grad))


def _targets_by_loop(mask, factor, threshold, lengths=None):
    B, T = mask.shape
    out = torch.zeros(B, T // factor, dtype=torch.bool)
    for b in range(B):
        for j in range(T // factor):
            if lengths is not None and (j + 1) * factor > int(lengths[b]):
                continue
            out[b, j] = int(mask[b, j * factor:(j + 1) * factor].sum()) / factor >= threshold - 1e-12
    return out


@pytest.mark.parametrize("factor,threshold", [(8, 0.8), (4, 0.5), (8, 1.0), (8, 0.0), (3, 0.7), (1, 0.8)])
def test_encoder_target_mask_matches_the_definition(factor, threshold):
    g = torch.Generator().manual_seed(factor)
    B, T = 5, 8 * 13 + 5  # a partial last group
    mask = torch.rand(B, T, generator=g) < 0.7
    lengths = torch.tensor([T, 0, 50, 49, 200])
    assert torch.equal(encoder_target_mask(mask, factor, threshold), _targets_by_loop(mask, factor, threshold))
    assert torch.equal(encoder_target_mask(mask, factor, threshold, lengths=lengths),
                       _targets_by_loop(mask, factor, threshold, lengths))


def test_encoder_target_mask_threshold_edges_and_num_frames():
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, :7] = True  # 7 of 8: >= 0.8 * 8 = 6.4
    mask[0, 8:14] = True  # 6 of 8: below
    mask[0, 16:24] = True
    assert encoder_target_mask(mask).tolist() == [[True, False, True]]
    assert encoder_target_mask(mask, threshold=0.75).tolist() == [[True, True, True]]  # 6 >= 6.0
    assert encoder_target_mask(mask, num_frames=5).tolist() == [[True, False, True, False, False]]
    assert encoder_target_mask(mask, num_frames=2).tolist() == [[True, False]]
    m = BlockMasking(2, target_factor=4, target_threshold=1.0)
    assert m.target_mask(mask).tolist() == [[True, False, True, False, True, True]]  # groups of 4, all masked
    for bad in (dict(factor=0), dict(threshold=1.5), dict(num_frames=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            encoder_target_mask(mask, **bad)
    with pytest.raises(ValueError, match="mask"):
        encoder_target_mask(mask.int())


def test_defaults_give_targets_on_masked_stretches():
    """With the defaults about a third of 16 s of input is masked, mostly in 40-frame blocks, so
    targets exist and every target's 8 frames are indeed >= 80 % masked."""
    m = BlockMasking(1, rank=0)
    feats, lengths = torch.zeros(8, 1600, 1), torch.full((8,), 1600)
    _, mask = m(feats, lengths)
    tgt = m.target_mask(mask, lengths)
    assert tgt.shape == (8, 200) and tgt.any()
    frac = mask.reshape(8, 200, 8).float().mean(-1)
    assert bool((frac[tgt] >= 0.8).all()) and bool((frac[~tgt] < 0.8).all())


def test_bad_arguments():
    with pytest.raises(ValueError, match="feats"):
        BlockMasking(6)(torch.zeros(2, 10, 5), torch.tensor([10, 10]))
    for kw in (dict(mask_prob=2.0), dict(max_mask_ratio=-0.1), dict(block_size=0), dict(min_start=-1),
               dict(align=0), dict(target_factor=0), dict(target_threshold=1.1), dict(rank=-1)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            BlockMasking(6, **kw)
    with pytest.raises(ValueError, match="feat_dim"):
        BlockMasking(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_module_matches_cpu_without_host_sync():
    cpu = BlockMasking(6, seed=9, rank=1, **P)
    gpu = BlockMasking(6, seed=9, rank=1, **P).cuda()
    feats, lengths = batch()
    ref = cpu(feats, lengths)
    feats_c, lengths_c = feats.cuda(), lengths.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masked, mask = gpu(feats_c, lengths_c)
        tgt = gpu.target_mask(mask, lengths_c)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(mask.cpu(), ref[1]) and torch.equal(masked.cpu(), ref[0])
    assert torch.equal(tgt.cpu(), cpu.target_mask(ref[1], lengths))
