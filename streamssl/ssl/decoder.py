"""Prediction head of self-supervised pretraining: encoder frames -> logits per target column.

A target column is one (offset, codebook) pair: masked prediction scores each codebook of the
frame's own token (offset 0); next-token prediction scores the tokens ``offsets`` frames ahead.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class MaskedPredictionHead(nn.Module):
    """A linear classifier per target column over the encoder output, applied at scored frames only.

    Args:
        d_model: encoder width D.
        num_codes: codes per codebook C.
        num_columns: target columns K (offsets x codebooks).
    """

    def __init__(self, d_model: int, num_codes: int, num_columns: int = 1):
        super().__init__()
        self.num_codes, self.num_columns = num_codes, num_columns
        self.proj = nn.Linear(d_model, num_codes * num_columns)

    def forward(self, encoded: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at the selected frames.

        Args:
            encoded: (B, T', D) encoder output.
            positions: (B, T') bool, True at scored frames.
        Returns:
            (N, K, C) logits for the N selected frames, in row-major (b, t) order. Selecting the
            frames first keeps the (N, K, C) tensor small; the boolean index costs one host
            synchronisation per step.
        """
        selected = encoded[positions]  # (N, D)
        return self.proj(selected).view(-1, self.num_columns, self.num_codes)

    @torch.no_grad()
    def set_prior(self, counts: torch.Tensor, smoothing: float = 1.0) -> None:
        """Start every column's bias at the log of a target unigram distribution.

        Without it an untrained head starts at the uniform distribution (ln C nats) and the fastest
        way down to the targets' marginal is to make the encoder output a constant that the weights
        map to it, a collapse the encoder does not recover from. With the marginal in the bias from
        step 0, only input-dependent predictions lower the loss.

        Args:
            counts: (K, C) or (C,) target counts (add-``smoothing`` estimate).
        """
        counts = counts.double().reshape(-1, self.num_codes).expand(self.num_columns, -1)
        p = (counts + smoothing) / (counts.sum(-1, keepdim=True) + smoothing * self.num_codes)
        log_p = p.log()
        log_p -= log_p.mean(-1, keepdim=True)  # softmax is shift-invariant; keep the bias centred
        self.proj.bias.copy_(log_p.reshape(-1).to(self.proj.bias.dtype))
        if not math.isfinite(float(self.proj.bias.abs().max())):
            raise ValueError("set_prior: non-finite bias (counts must be non-negative)")
