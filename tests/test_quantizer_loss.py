"""BEST-RQ quantizer against a float64 brute-force reference; loss and code statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.ssl.loss import code_usage, masked_prediction_loss
from streamssl.ssl.quantizer import RandomProjectionQuantizer


def _brute_force_tokens(q: RandomProjectionQuantizer, feats: torch.Tensor):
    """Nearest code by float64 L2 distance over every code, plus the top-2 distance gap."""
    B, T, Fd = feats.shape
    Tq = T // q.stack
    stacked = feats[:, : Tq * q.stack].double().reshape(B * Tq, q.stack * Fd)
    tokens, gaps = [], []
    for g in range(q.num_codebooks):
        z = F.normalize(stacked @ q.projection[g].double(), dim=-1)
        d = torch.cdist(z, q.codebooks[g].double())  # (N, codes)
        two = d.topk(2, largest=False)
        tokens.append(two.indices[:, 0])
        # Squared distances on the unit sphere are 2 - 2 cos: the gap the float32 dot product sees.
        gaps.append((two.values[:, 1] ** 2 - two.values[:, 0] ** 2) / 2)
    return torch.stack(tokens, -1).reshape(B, Tq, -1), torch.stack(gaps, -1).reshape(B, Tq, -1)


@pytest.mark.parametrize("num_codebooks", [1, 3])
def test_tokens_match_float64_nearest_neighbour(num_codebooks):
    torch.manual_seed(0)
    q = RandomProjectionQuantizer(feat_in=80, stack=8, code_dim=16, num_codes=8192,
                                  num_codebooks=num_codebooks, seed=5, chunk_elements=8192 * 37)
    feats = torch.randn(3, 8 * 200 + 5, 80)
    tokens, tlen = q(feats, torch.tensor([1605, 800, 7]))
    assert tokens.shape == (3, 200, num_codebooks) and tokens.dtype == torch.int64
    assert tlen.tolist() == [200, 100, 0]
    ref, gap = _brute_force_tokens(q, feats)
    # float32 dot products of unit vectors in 16 dims carry ~1e-6 relative error; where the two
    # nearest codes are closer than 1e-5 the winner is not decidable in float32.
    decidable = gap > 1e-5
    assert decidable.float().mean() > 0.99
    assert torch.equal(tokens[decidable], ref[decidable])


def test_quantizer_is_frozen_and_seeded():
    a, b = RandomProjectionQuantizer(seed=1), RandomProjectionQuantizer(seed=1)
    c = RandomProjectionQuantizer(seed=2)
    assert list(a.parameters()) == []
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)
    assert torch.allclose(a.codebooks.norm(dim=-1), torch.ones(1, 8192), atol=1e-6)


def test_quantizer_rejects_wrong_feature_size():
    q = RandomProjectionQuantizer(feat_in=80)
    with pytest.raises(ValueError, match="feats must have 80"):
        q(torch.randn(1, 16, 64), torch.tensor([16]))


def test_loss_matches_definition_and_accuracy():
    torch.manual_seed(1)
    logits = torch.randn(50, 2, 11, requires_grad=True)
    targets = torch.randint(0, 11, (50, 2))
    loss, acc = masked_prediction_loss(logits, targets)
    manual = -torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).mean()
    assert math.isclose(loss.item(), manual.item(), rel_tol=1e-6)
    correct = sum(int(logits[i, g].argmax() == targets[i, g]) for i in range(50) for g in range(2))
    assert math.isclose(float(acc), correct / 100, rel_tol=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_loss_without_targets_is_zero_not_nan():
    logits = torch.randn(0, 1, 5, requires_grad=True)
    loss, acc = masked_prediction_loss(logits, torch.zeros(0, 1, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and acc.item() == 0.0


def test_code_usage():
    cov, ent = code_usage(torch.arange(8).repeat(3), 16)
    assert cov == 0.5 and math.isclose(ent, 3.0)
    cov, ent = code_usage(torch.zeros(10, dtype=torch.int64), 4)
    assert cov == 0.25 and ent == 0.0
