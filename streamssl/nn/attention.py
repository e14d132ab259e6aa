"""Relative-position multi-head self-attention (Transformer-XL, Dai et al. 2019) and its context masks.

Scores between query frame i and key frame j are

    ((q_i + u) · k_j + (q_i + v) · W_pos p(i - j)) / sqrt(d_head)

with learned per-head biases u, v and a sinusoidal embedding p of the signed distance i - j. Only
distances enter, so a streaming step that sees queries [q0, q0 + n_q) and cached keys [k0, k0 + n_k)
computes the same scores as the full-utterance pass: ``attend`` takes the distance range as an
argument instead of assuming that queries and keys start together.

Masks follow ``att_context_size = (left, right)`` in encoder frames (-1: unlimited):

* ``regular``: query i sees keys j with i - left <= j <= i + right. A right context looks ahead at
  every layer, so the encoder's lookahead is n_layers * right frames.
* ``chunked_limited``: frames are grouped in chunks of right + 1; query i sees every key in its own
  chunk and in the left // (right + 1) chunks before it (left must be a multiple of the chunk). The
  lookahead is at most right frames whatever the depth.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .dropout import Dropout

STYLES = ("regular", "chunked_limited")


def check_att_context(att_context_size, style: str, name: str = "att_context_size") -> tuple[int, int]:
    """Validate one (left, right) pair for ``style``; returns it as a tuple of ints."""
    if style not in STYLES:
        raise ValueError(f"att_context_style must be one of {STYLES}, got {style!r}")
    try:
        left, right = (int(v) for v in att_context_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair [left, right] of ints, got {att_context_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{name} entries must be >= -1 (-1 = unlimited), got {[left, right]}")
    if style == "chunked_limited":
        if right < 0:
            raise ValueError(f"{name}={[left, right]}: chunked_limited needs right >= 0 (the chunk is right + 1 frames)")
        if left >= 0 and left % (right + 1) != 0:
            raise ValueError(
                f"{name}={[left, right]}: with chunked_limited, left must be -1 or a multiple of the chunk "
                f"right + 1 = {right + 1}"
            )
    return left, right


def context_mask(
    q_start: int, n_q: int, k_start: int, n_k: int, att_context_size: tuple[int, int], style: str, device=None
) -> torch.Tensor:
    """(n_q, n_k) bool: True where query frame q_start + a may attend to key frame k_start + b.

    Positions are absolute encoder frames of the utterance, so streaming steps and the full pass
    share one rule. Padding is not handled here (see ``key_padding_mask``).
    """
    left, right = att_context_size
    i = torch.arange(q_start, q_start + n_q, device=device).unsqueeze(1)
    j = torch.arange(k_start, k_start + n_k, device=device).unsqueeze(0)
    if style == "regular":
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
        if right >= 0:
            allowed = allowed & (j <= i + right)
        if left >= 0:
            allowed = allowed & (j >= i - left)
        return allowed
    chunk = right + 1
    ci, cj = torch.div(i, chunk, rounding_mode="floor"), torch.div(j, chunk, rounding_mode="floor")
    allowed = cj <= ci
    if left >= 0:
        allowed = allowed & (ci - cj <= left // chunk)
    return allowed


def rel_position_sinusoid(d_max: int, length: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, d_model) sinusoidal embeddings of the distances d_max, d_max - 1, ..., d_max - length + 1.

    Row r holds sin(d w_k) in even and cos(d w_k) in odd channels for d = d_max - r, w_k =
    10000^(-2k / d_model). Computed in float32 from exact integer distances, then cast, so the same
    distance gives the same row in every call.
    """
    d = torch.arange(d_max, d_max - length, -1, device=device, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(d * inv_freq)
    pe[:, 1::2] = torch.cos(d * inv_freq[: d_model // 2])
    return pe.to(dtype)


def rel_shift(x: torch.Tensor, n_k: int) -> torch.Tensor:
    """(..., n_q, n_q + n_k - 1) -> (..., n_q, n_k): out[..., a, b] = x[..., a, b + n_q - 1 - a].

    Column c of x holds distance d_max - c; query a and key b are at distance d_max - (n_q - 1 - a + b),
    so this picks each pair's distance. Done with one zero-copy strided view: row a starts n_q - 1 - a
    columns in, i.e. each row's start moves back by one from the row before (stride L - 1).
    """
    *lead, n_q, L = x.shape
    if L != n_q + n_k - 1:
        raise ValueError(f"rel_shift: last dimension must be n_q + n_k - 1 = {n_q + n_k - 1}, got {L}")
    x = x.contiguous()
    lead_strides = x.stride()[:-2]
    return x.as_strided((*lead, n_q, n_k), (*lead_strides, L - 1, 1), x.storage_offset() + n_q - 1)


class RelPositionMultiHeadAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions and learned u/v biases.

    Args:
        d_model: model width D (a multiple of n_heads).
        n_heads: heads H; d_head = D / H.
        dropout: dropout on the attention probabilities (training only).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_head))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of (already normalised) frames x (B, T, D): two (B, H, T, d_head)."""
        return self._heads(self.linear_k(x)), self._heads(self.linear_v(x))

    def project_pos(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """W_pos p(d) for rows of ``rel_position_sinusoid``: (L, D) -> (L, D). Row-wise, so a table
        of projected distances can be extended piece by piece (the streaming state does)."""
        return self.linear_pos(pos_emb)

    def attend(
        self, xq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, pos_proj: torch.Tensor
    ) -> torch.Tensor:
        """Attention of n_q query frames over n_k key frames.

        Args:
            xq: (B, n_q, D) normalised query frames.
            k, v: (B, H, n_k, d_head) from ``project_kv``.
            allowed: (B, n_q, n_k) or (n_q, n_k) bool; False entries get zero weight. A query with no
                allowed key (a padded frame) gets a zero output instead of NaN.
            pos_proj: (n_q + n_k - 1, D) ``project_pos`` of the ``rel_position_sinusoid`` rows for the
                distances from (last query - first key) down to (first query - last key).
        Returns:
            (B, n_q, D).
        """
        B, n_q, _ = xq.shape
        n_k = k.shape[2]
        q = self._heads(self.linear_q(xq))  # (B, H, n_q, d_head)
        p = pos_proj.view(-1, self.n_heads, self.d_head).transpose(0, 1)  # (H, L, d_head)
        scale = 1.0 / math.sqrt(self.d_head)
        ac = torch.matmul(q + self.pos_bias_u.unsqueeze(1), k.transpose(-2, -1))  # (B, H, n_q, n_k)
        bd = rel_shift(torch.matmul(q + self.pos_bias_v.unsqueeze(1), p.transpose(-2, -1)), n_k)
        scores = (ac + bd) * scale
        if allowed.dim() == 2:
            allowed = allowed.unsqueeze(0)
        allowed = allowed.unsqueeze(1)  # (B or 1, 1, n_q, n_k)
        # Softmax in at least float32 (bf16 autocast would otherwise round the normaliser). Masked
        # entries get the most negative float, whose exp underflows to exactly 0 next to any allowed
        # entry; rows with nothing allowed are zeroed after the softmax instead of becoming NaN.
        acc = torch.promote_types(scores.dtype, torch.float32)
        scores = scores.to(acc).masked_fill(~allowed, torch.finfo(acc).min)
        attn = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0).to(v.dtype)
        out = torch.matmul(self.dropout(attn), v)  # (B, H, n_q, d_head)
        return self.linear_out(out.transpose(1, 2).reshape(B, n_q, self.d_model))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """Full-sequence self-attention: x (B, T, D), allowed (B, T, T) or (T, T) bool,
        pos_emb (2T - 1, D) for distances T-1 ... -(T-1). Returns (B, T, D)."""
        k, v = self.project_kv(x)
        return self.attend(x, k, v, allowed, self.project_pos(pos_emb))
