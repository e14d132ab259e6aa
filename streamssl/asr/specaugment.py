"""SpecAugment-style masking of log-mel features for fine-tuning (Park et al. 2019), on the batch's device.

Frequency masks: ``freq_masks`` bands of up to ``freq_width`` bins each. Time masks:
``time_masks`` spans of up to ``time_width`` frames (or that fraction of the utterance when
``time_width < 1``). Masked values are set to ``fill`` (0: the mean of normalised features).
Only in training; a pure function of the generator, so runs resume exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SpecAugment(nn.Module):
    def __init__(self, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2, time_width: float = 0.05,
                 fill: float = 0.0):
        super().__init__()
        for name, v in (("freq_masks", freq_masks), ("freq_width", freq_width), ("time_masks", time_masks)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if time_width < 0:
            raise ValueError(f"time_width must be >= 0, got {time_width}")
        self.freq_masks, self.freq_width = int(freq_masks), int(freq_width)
        self.time_masks, self.time_width, self.fill = int(time_masks), float(time_width), float(fill)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, F) features, (B,) int64 valid frames -> masked copy (unchanged in eval mode)."""
        if not self.training or (self.freq_masks == 0 and self.time_masks == 0):
            return feats
        B, T, Fdim = feats.shape
        dev = feats.device
        keep = torch.ones(B, T, Fdim, dtype=torch.bool, device=dev)
        f = torch.arange(Fdim, device=dev)
        for _ in range(self.freq_masks):
            w = (torch.rand(B, generator=generator, device=dev) * (self.freq_width + 1)).long()
            s = (torch.rand(B, generator=generator, device=dev) * (Fdim - w + 1).clamp(min=1)).long()
            keep &= ~((f >= s[:, None]) & (f < (s + w)[:, None]))[:, None, :]
        t = torch.arange(T, device=dev)
        for _ in range(self.time_masks):
            if self.time_width < 1:
                max_w = (lengths.to(torch.float32) * self.time_width).long()
            else:
                max_w = torch.full((B,), int(self.time_width), device=dev)
            w = (torch.rand(B, generator=generator, device=dev) * (max_w + 1)).long()
            s = (torch.rand(B, generator=generator, device=dev) * (lengths - w + 1).clamp(min=1)).long()
            keep &= ~((t >= s[:, None]) & (t < (s + w)[:, None]))[:, :, None]
        return feats.masked_fill(~keep, self.fill)
