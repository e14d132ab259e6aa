"""Prediction head of masked-token pretraining: encoder frames -> logits per codebook."""

from __future__ import annotations

import torch
import torch.nn as nn


class MaskedPredictionHead(nn.Module):
    """A linear classifier per codebook over the encoder output, applied at target frames only.

    Args:
        d_model: encoder width D.
        num_codes: codes per codebook C.
        num_codebooks: G.
    """

    def __init__(self, d_model: int, num_codes: int, num_codebooks: int = 1):
        super().__init__()
        self.num_codes, self.num_codebooks = num_codes, num_codebooks
        self.proj = nn.Linear(d_model, num_codes * num_codebooks)

    def forward(self, encoded: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at the selected frames.

        Args:
            encoded: (B, T', D) encoder output.
            positions: (B, T') bool, True at target frames.
        Returns:
            (N, G, C) logits for the N selected frames, in row-major (b, t) order. Selecting the
            frames first keeps the (N, G, C) tensor a third of the full one with NEST's masking;
            the boolean index costs one host synchronisation per step.
        """
        selected = encoded[positions]  # (N, D)
        return self.proj(selected).view(-1, self.num_codebooks, self.num_codes)
