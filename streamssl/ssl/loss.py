"""Masked-prediction loss and the statistics logged with it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_prediction_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over tokens and codebooks, and masked-token accuracy.

    Args:
        logits: (N, G, C) float, for N target frames and G codebooks.
        targets: (N, G) int64 code indices.
    Returns:
        loss: scalar float32 (0 with a zero gradient when N == 0, so a batch without targets does
        not poison the run with NaN). acc: scalar float32, fraction of (frame, codebook) pairs
        whose argmax equals the target.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits (N, G, C) = {tuple(logits.shape)} do not match targets (N, G) = {tuple(targets.shape)}")
    if targets.numel() == 0:
        zero = logits.float().sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="mean")
    acc = (logits.detach().argmax(-1) == targets).float().mean()
    return loss, acc


@torch.no_grad()
def code_usage(tokens: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """Codebook coverage and entropy of a set of tokens.

    Args:
        tokens: int64 tensor of code indices (any shape).
        num_codes: C.
    Returns:
        (coverage, entropy): the fraction of the C codes that occur, and the entropy of their
        empirical distribution in bits (log2 C when all codes are equally frequent).
    """
    if tokens.numel() == 0:
        return 0.0, 0.0
    counts = torch.bincount(tokens.flatten(), minlength=num_codes).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = max(0.0, float(-(nz * nz.log2()).sum()))  # max: no "-0.0" for a single code
    coverage = float((counts > 0).sum()) / num_codes
    return coverage, entropy if math.isfinite(entropy) else 0.0
