"""FastConformerEncoder: causal 8x subsampling + conformer blocks, with exact cache-aware streaming.

Full-utterance pass::

    out, out_lengths = enc(feats, lengths)          # (B, T, F) -> (B, ceil(T / 8), D)

Streaming (eval mode)::

    state = enc.init_stream_state(B)
    for chunk, chunk_lengths in chunks:              # (B, enc.stream_chunk_frames(), F)
        out, out_lengths, state = enc.stream_step(chunk, chunk_lengths, state)

Concatenating ``out[b, :out_lengths[b]]`` over the steps gives ``enc(feats, lengths)[0][b, :T'_b]``
for every row b (to float rounding). A row ends in the step where its chunk_lengths is below the
chunk size (or ``final=True``); it is then flushed: all its remaining frames come out in that step.

Why the streaming result is exact, not approximate: every piece is either per frame (feed-forwards,
LayerNorms, projections), causal with a cache (subsampling stages, depthwise conv), or attention
whose mask is a function of absolute frame positions (``attention.context_mask``) with relative
position terms that depend only on distances. The stream state keeps, per layer, the keys and values
every future query may still see (the left context) and, for the ``regular`` style with right context,
the frames whose queries wait for their lookahead; layers run in lockstep on all rows.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from ..ops.reference import philox4x32_10
from .attention import check_att_context, context_mask, rel_position_sinusoid
from .conformer import ConformerBlock
from .conv_module import valid_mask
from .encoder_streaming import CacheAwareStreaming, EncoderStreamState, LayerStreamState
from .subsampling import CausalStridingSubsampling

__all__ = ["FastConformerEncoder", "EncoderStreamState", "LayerStreamState"]


def _parse_contexts(att_context_size, style: str) -> list[tuple[int, int]]:
    """A pair [l, r] or a list of pairs -> list of validated (l, r) tuples."""
    try:
        first = att_context_size[0]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"att_context_size must be a pair [left, right] or a list of pairs, got {att_context_size!r}") from None
    pairs = [att_context_size] if isinstance(first, numbers.Integral) else list(att_context_size)
    if not pairs:
        raise ValueError("att_context_size must not be an empty list")
    return [check_att_context(p, style) for p in pairs]


class FastConformerEncoder(CacheAwareStreaming, nn.Module):
    """Causal FastConformer encoder with exact chunk-by-chunk streaming.

    Args:
        feat_in: feature bins F (80 log-mels).
        d_model, n_layers, n_heads, ff_expansion, conv_kernel_size: block sizes.
        subsampling_factor: time reduction (power of two; 8 gives 80 ms encoder frames at a 10 ms hop).
        subsampling_channels: conv channels of the subsampling.
        att_context_size: [left, right] in encoder frames (-1 = unlimited), or a list of such pairs to
            train several latencies at once: each training forward draws one, reproducibly (see
            ``draw_att_context_size``); eval and streaming use ``att_context_size`` (the first pair
            unless ``set_default_att_context_size`` chose another).
        att_context_style: "chunked_limited" (chunks of right + 1 frames; left a multiple of it) or
            "regular" (a sliding window; the right context adds up over layers).
        dropout: residual-branch, feed-forward and attention dropout.
        att_context_seed: seed of the per-forward draw among several contexts.
        conv_impl: "op" (``streamssl.ops.causal_dwconv_ln``) or "reference" (the pure-PyTorch
            composition; same function, for benchmarks).
    """

    def __init__(
        self,
        feat_in: int = 80,
        d_model: int = 176,
        n_layers: int = 16,
        n_heads: int = 4,
        ff_expansion: int = 4,
        conv_kernel_size: int = 9,
        subsampling_factor: int = 8,
        subsampling_channels: int = 256,
        att_context_size=(-1, 0),
        att_context_style: str = "chunked_limited",
        dropout: float = 0.1,
        *,
        att_context_seed: int = 0,
        conv_impl: str = "op",
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.att_context_style = att_context_style
        self.att_context_sizes = _parse_contexts(att_context_size, att_context_style)
        self._att_context = self.att_context_sizes[0]
        self.att_context_seed = int(att_context_seed)
        self._att_context_draws = 0
        self.feat_in, self.d_model, self.n_layers = feat_in, d_model, n_layers
        self.subsampling_factor = subsampling_factor
        self.subsampling = CausalStridingSubsampling(feat_in, d_model, subsampling_factor, subsampling_channels)
        self.layers = nn.ModuleList(
            ConformerBlock(d_model, n_heads, ff_expansion, conv_kernel_size, dropout, conv_impl) for _ in range(n_layers)
        )

    # ---- attention context ---------------------------------------------------------------------

    @property
    def att_context_size(self) -> tuple[int, int]:
        """The (left, right) pair used in eval mode, for streaming and for the latency figures."""
        return self._att_context

    def set_default_att_context_size(self, att_context_size) -> None:
        """Choose the (left, right) pair for eval and streaming (any valid pair for this style)."""
        self._att_context = check_att_context(att_context_size, self.att_context_style)

    def draw_att_context_size(self) -> tuple[int, int]:
        """The context for the next training forward: one of ``att_context_sizes``, uniformly.

        Draw n is ``floor(u * len(att_context_sizes))`` with u from Philox4x32-10 (the generator of
        the masking op) keyed by ``att_context_seed`` at counter (n, 0, 1) — a pure function of the
        seed and the number of draws (saved in the state dict): the same on every DDP rank, and a
        resumed run continues the sequence. CPU integer arithmetic only: no device work, no sync.
        """
        if len(self.att_context_sizes) == 1:
            return self.att_context_sizes[0]
        n, seed, m32 = self._att_context_draws, self.att_context_seed % 2**64, 0xFFFFFFFF
        word = philox4x32_10((n & m32, (n >> 32) & m32, 0, 1), (seed & m32, seed >> 32))[0]
        self._att_context_draws += 1
        u = (int(word) >> 8) * 2.0**-24
        return self.att_context_sizes[int(u * len(self.att_context_sizes))]

    def get_extra_state(self) -> dict:
        return {"att_context_draws": self._att_context_draws}

    def set_extra_state(self, state: dict) -> None:
        self._att_context_draws = int(state["att_context_draws"])

    # ---- latency -------------------------------------------------------------------------------

    def _streamable(self, ctx: tuple[int, int]) -> None:
        if ctx[1] < 0:
            raise ValueError(
                f"att_context_size={list(ctx)} has right = -1 (sees the whole utterance): it cannot stream"
            )

    def stream_chunk_frames(self) -> int:
        """Feature frames per streaming step (the minimum; ``stream_step`` takes any multiple).

        ``factor * (right + 1)`` for chunked_limited (one attention chunk), ``factor`` for regular
        (one encoder frame; the right context is waited for inside the state).
        """
        self._streamable(self._att_context)
        right = self._att_context[1]
        chunk = right + 1 if self.att_context_style == "chunked_limited" else 1
        return self.subsampling_factor * chunk

    def chunk_ms(self, frame_shift_ms: float = 10.0) -> float:
        """Audio per streaming step in ms: ``stream_chunk_frames() * frame_shift_ms``."""
        return self.stream_chunk_frames() * frame_shift_ms

    def lookahead_ms(self, frame_shift_ms: float = 10.0) -> float:
        """How much audio after an encoder frame's own group of ``factor`` feature frames its output
        needs (worst case over frames), in ms. ``math.inf`` for right = -1.

        chunked_limited: right * factor * frame_shift (the first frame of a chunk waits for the other
        ``right``). regular: n_layers * right * factor * frame_shift (each layer looks ``right``
        frames further). At factor 8 and 10 ms, one encoder frame is 80 ms.
        """
        right = self._att_context[1]
        if right < 0:
            return math.inf
        frames = right if self.att_context_style == "chunked_limited" else self.n_layers * right
        return frames * self.subsampling_factor * frame_shift_ms

    def latency_ms(self, frame_shift_ms: float = 10.0) -> float:
        """Worst-case algorithmic latency in ms: from a feature frame's arrival to the earliest
        output that uses it becoming computable. ``(factor - 1) * frame_shift_ms + lookahead_ms()``:
        the first frame of a group waits for the other factor - 1, then for the lookahead. Excludes
        the feature window (25 ms) and compute time."""
        return (self.subsampling_factor - 1) * frame_shift_ms + self.lookahead_ms(frame_shift_ms)

    # ---- input checks --------------------------------------------------------------------------

    def _check_feats(self, feats, name: str) -> None:
        if not isinstance(feats, torch.Tensor) or feats.dim() != 3 or feats.shape[-1] != self.feat_in:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"{name} must have shape (B, T, feat_in={self.feat_in}), got {shape}")
        if not feats.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {feats.dtype}")
        if feats.shape[0] < 1 or feats.shape[1] < 1:
            raise ValueError(f"{name} must have B >= 1 and T >= 1, got shape {tuple(feats.shape)}")

    @staticmethod
    def _check_lengths(lengths, B: int, T: int, name: str, device) -> torch.Tensor:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,):
            raise ValueError(f"{name} must be a ({B},) integer tensor, got {getattr(lengths, 'shape', type(lengths).__name__)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {lengths.dtype}")
        if lengths.device.type == "cpu":  # free to check here; on an accelerator it would be a host sync
            bad = (lengths < 0) | (lengths > T)
            if bool(bad.any()):
                raise ValueError(f"{name} must be in [0, {T}] (T = the time dimension), got {lengths.tolist()}")
        elif lengths.device.type == "cuda":
            torch._assert_async(((lengths >= 0) & (lengths <= T)).all(), f"{name} must be in [0, {T}]")
        return lengths.to(device=device, dtype=torch.int64)

    # ---- full-utterance pass -------------------------------------------------------------------

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, att_context_size=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        Args:
            feats: (B, T, feat_in) float log-mels (not normalised per utterance).
            lengths: (B,) integer valid frames per row, 0 <= lengths <= T (any device; checked on the
                host only when it lives there, so the forward never synchronises).
            att_context_size: a (left, right) pair overriding the context for this call. Otherwise a
                training forward draws one of ``att_context_sizes`` and an eval forward uses
                ``att_context_size``.
        Returns:
            out: (B, ceil(T / factor), d_model), zero at padded frames.
            out_lengths: (B,) int64 ceil(lengths / factor).
        """
        self._check_feats(feats, "feats")
        B, T, _ = feats.shape
        lengths = self._check_lengths(lengths, B, T, "lengths", feats.device)
        if att_context_size is not None:
            ctx = check_att_context(att_context_size, self.att_context_style)
        elif self.training:
            ctx = self.draw_att_context_size()
        else:
            ctx = self._att_context
        x, out_lengths = self.subsampling(feats, lengths)
        Tp = x.shape[1]
        # One (B, T', T') mask for all layers: context rule and key padding. Query padding needs no
        # mask: padded frames are zeroed before every time-mixing layer and in the output.
        valid = valid_mask(out_lengths, Tp)
        allowed = context_mask(0, Tp, 0, Tp, ctx, self.att_context_style, x.device).unsqueeze(0) & valid.unsqueeze(1)
        pos_emb = rel_position_sinusoid(Tp - 1, 2 * Tp - 1, self.d_model, x.device, x.dtype)
        for block in self.layers:
            x = block(x, out_lengths, allowed, pos_emb)
        return x.masked_fill(~valid.unsqueeze(-1), 0.0), out_lengths
