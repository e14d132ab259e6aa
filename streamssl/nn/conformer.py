"""One FastConformer block: ½FF → relative-position MHSA → causal conv module → ½FF → LayerNorm.

Pre-norm residual branches with dropout (Gulati et al. 2020, macaron feed-forwards). The block is
split at the attention so the encoder's streaming step can queue frames between the first
feed-forward (per frame) and the attention (which may wait for right context), and cache keys and
values rather than recomputing them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import RelPositionMultiHeadAttention
from .conv_module import CausalConvModule
from .dropout import Dropout


class FeedForward(nn.Module):
    """LayerNorm → Linear(D, e·D) → SiLU → dropout → Linear(e·D, D), per frame."""

    def __init__(self, d_model: int, expansion: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, expansion * d_model)
        self.activation = nn.SiLU()
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(expansion * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        return self.linear2(self.dropout(self.activation(self.linear1(self.norm(x)))))


class ConformerBlock(nn.Module):
    """A causal FastConformer block on (B, T, D).

    Args:
        d_model: width D. n_heads: attention heads. ff_expansion: feed-forward width factor.
        conv_kernel_size: depthwise taps of the conv module. dropout: on every residual branch, the
        feed-forward hidden layer and the attention probabilities. conv_impl: see CausalConvModule.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_expansion: int = 4,
        conv_kernel_size: int = 9,
        dropout: float = 0.1,
        conv_impl: str = "op",
    ):
        super().__init__()
        self.ff1 = FeedForward(d_model, ff_expansion, dropout)
        self.norm_att = nn.LayerNorm(d_model)
        self.attn = RelPositionMultiHeadAttention(d_model, n_heads, dropout)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = CausalConvModule(d_model, conv_kernel_size, impl=conv_impl)
        self.ff2 = FeedForward(d_model, ff_expansion, dropout)
        self.norm_out = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor
    ) -> torch.Tensor:
        """Full-sequence forward.

        Args:
            x: (B, T, D). lengths: (B,) int64 valid frames (the conv module zeroes the rest).
            allowed: (B, T, T) bool attention mask (context and key padding), shared by all blocks.
            pos_emb: (2T - 1, D) relative-position sinusoid for distances T-1 ... -(T-1).
        Returns:
            (B, T, D).
        """
        h = self.pre_attention(x)
        a = self.norm_att(h)
        k, v = self.attn.project_kv(a)
        x = h + self.dropout(self.attn.attend(a, k, v, allowed, self.attn.project_pos(pos_emb)))
        x = x + self.dropout(self.conv(self.norm_conv(x), lengths))
        return self.post_conv(x)

    # ---- pieces for the streaming step ---------------------------------------------------------

    def pre_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x + ½FF(x): the residual stream entering the attention, per frame."""
        return x + 0.5 * self.dropout(self.ff1(x))

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, t, d_head) of frames h from ``pre_attention``."""
        return self.attn.project_kv(self.norm_att(h))

    def post_conv(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(x + 0.5 * self.dropout(self.ff2(x)))

    def step(
        self,
        h: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor,
        pos_proj: torch.Tensor,
        conv_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish frames h (B, t, D) from ``pre_attention`` given all keys/values they may attend to.

        Args:
            h: (B, t, D) query frames, t >= 1. k, v: (B, H, n_k, d_head).
            allowed: (B, t, n_k) bool. pos_proj: (t + n_k - 1, D) projected relative positions, see
                ``RelPositionMultiHeadAttention.attend``.
            conv_cache: (B, K-1, D) from the previous step or None at the start.
        Returns:
            (B, t, D) block outputs and the conv module's next cache.
        """
        x = h + self.dropout(self.attn.attend(self.norm_att(h), k, v, allowed, pos_proj))
        c, conv_cache = self.conv.step(self.norm_conv(x), conv_cache)
        return self.post_conv(x + self.dropout(c)), conv_cache
