"""BEST-RQ random-projection quantizer: clean features -> discrete targets (docs/ARCHITECTURE.md, "Pretraining")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection + nearest unit code, one or several codebooks.

    Frames are stacked by ``stack`` (the encoder's subsampling factor) so that token j describes
    input frames [j * stack, (j + 1) * stack), the frames encoder frame j covers. Each stack is
    projected by a frozen Xavier-uniform matrix to ``code_dim``, L2-normalised, and matched to the
    nearest of ``num_codes`` frozen unit vectors: on the unit sphere the nearest code in L2 is the
    one with the largest dot product, which is computed in float32 in row chunks so neither a
    (N, codes, dim) tensor nor full (N, codes) logits for a long batch ever exist.

    Nothing here is trained; the buffers are saved with the model so targets stay fixed on resume.
    """

    def __init__(
        self,
        feat_in: int = 80,
        stack: int = 8,
        code_dim: int = 16,
        num_codes: int = 8192,
        num_codebooks: int = 1,
        seed: int = 0,
        chunk_elements: int = 1 << 22,
    ):
        super().__init__()
        for name, value in (("feat_in", feat_in), ("stack", stack), ("code_dim", code_dim),
                            ("num_codes", num_codes), ("num_codebooks", num_codebooks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.feat_in, self.stack, self.code_dim = feat_in, stack, code_dim
        self.num_codes, self.num_codebooks = num_codes, num_codebooks
        self.chunk_elements = chunk_elements
        g = torch.Generator().manual_seed(seed)
        fan_in, fan_out = feat_in * stack, code_dim
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # Xavier uniform
        proj = (torch.rand(num_codebooks, fan_in, code_dim, generator=g) * 2 - 1) * bound
        codes = F.normalize(torch.randn(num_codebooks, num_codes, code_dim, generator=g), dim=-1)
        self.register_buffer("projection", proj)
        self.register_buffer("codebooks", codes)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features -> (B, T // stack, G, code_dim) float32 unit vectors."""
        B, T, Fdim = feats.shape
        if Fdim != self.feat_in:
            raise ValueError(f"feats must have {self.feat_in} features, got shape {tuple(feats.shape)}")
        Tq = T // self.stack
        stacked = feats[:, : Tq * self.stack].float().reshape(B, Tq, self.stack * Fdim)
        z = torch.einsum("btf,gfd->btgd", stacked, self.projection.float())
        return F.normalize(z, dim=-1)

    @torch.no_grad()
    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets for (B, T, F) features.

        Args:
            feats: (B, T, F) float (any float dtype; computed in float32).
            lengths: (B,) int64 valid frames.
        Returns:
            tokens: (B, T // stack, num_codebooks) int64 code indices.
            token_lengths: (B,) int64, lengths // stack (a token needs all its frames).
        """
        with torch.autocast(device_type=feats.device.type, enabled=False):
            z = self.project(feats)  # (B, Tq, G, d)
            B, Tq, G, d = z.shape
            tokens = torch.empty(B * Tq, G, dtype=torch.int64, device=feats.device)
            flat = z.reshape(B * Tq, G, d)
            rows = max(1, self.chunk_elements // self.num_codes)
            for g in range(G):
                codes_t = self.codebooks[g].float().t()  # (d, codes)
                for start in range(0, B * Tq, rows):
                    scores = flat[start : start + rows, g] @ codes_t  # (rows, codes)
                    tokens[start : start + rows, g] = scores.argmax(dim=-1)
        return tokens.reshape(B, Tq, G), torch.div(lengths, self.stack, rounding_mode="floor")
