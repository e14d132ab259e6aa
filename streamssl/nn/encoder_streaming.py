"""Cache-aware streaming for FastConformerEncoder: the stream state and the chunk-by-chunk step.

The encoder's module docstring says what streaming computes and why it equals the full pass; this
module holds how: ``EncoderStreamState`` (per row and per layer, everything a step needs from the
past) and the ``CacheAwareStreaming`` methods the encoder inherits (``init_stream_state``,
``stream_step``, ``forward_streaming``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .attention import context_mask, rel_position_sinusoid
from .conv_module import valid_mask


@dataclass
class LayerStreamState:
    """Per-layer streaming state (B = batch, H = heads, d_head = D / H, K = conv kernel).

    Attributes:
        k, v: (B, H, n_kv, d_head) keys and values of layer-input frames [kv_start, kv_start + n_kv):
            the left context future queries may see, plus the queued frames.
        pending: (B, n_pending, D) residual stream (after the first ½FF) of frames
            [done, done + n_pending) whose queries wait for right context (``regular`` style only).
        conv_cache: (B, K-1, D) the conv module's cache.
        kv_start: absolute encoder frame of k[:, :, 0].
        done: frames this layer has output so far.
        pos: (n_pos, D) this layer's projected relative-position rows for the distances
            pos_hi, pos_hi - 1, ..., pos_hi - n_pos + 1 met so far; extended only by new distances,
            so a step projects O(new frames) rows, not the whole left context.
        pos_hi: the distance of pos[0].
    """

    k: torch.Tensor
    v: torch.Tensor
    pending: torch.Tensor
    conv_cache: torch.Tensor
    kv_start: int
    done: int
    pos: torch.Tensor
    pos_hi: int


@dataclass
class EncoderStreamState:
    """Everything ``stream_step`` needs from the past, for every row of the batch.

    Attributes:
        batch_size: B.
        att_context_size, att_context_style: the context the state was built for.
        subsampling: per subsampling stage, its last input frame: (B, 1, 1, F), (B, C, 1, F/2), ...
        layers: one ``LayerStreamState`` per conformer block.
        feat_lengths: (B,) int64 valid feature frames received per row.
        lengths: (B,) int64 valid encoder frames per row so far (ceil(feat_lengths / factor)).
        ended: per row, whether its last chunk has been seen.
        emitted: encoder frames the last layer has output (the same for all rows: layers run in lockstep).
    """

    batch_size: int
    att_context_size: tuple[int, int]
    att_context_style: str
    subsampling: list[torch.Tensor]
    layers: list[LayerStreamState]
    feat_lengths: torch.Tensor
    lengths: torch.Tensor
    ended: tuple[bool, ...]
    emitted: int


class CacheAwareStreaming:
    """Streaming methods of :class:`~streamssl.nn.encoder.FastConformerEncoder`.

    Not a model of its own: it uses the encoder's ``subsampling``, ``layers``, ``d_model``,
    ``n_layers``, ``subsampling_factor``, the current context (``_att_context``,
    ``att_context_style``, ``stream_chunk_frames``, ``_streamable``) and its input checks.
    """

    def init_stream_state(self, batch_size: int, device=None, dtype=None) -> EncoderStreamState:
        """Empty streaming state for ``batch_size`` rows and the current ``att_context_size``.

        device / dtype default to the parameters'. Keys and values for an unlimited left context
        (left = -1) grow with the utterance; with left = L they hold at most L (+ queued) frames.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._streamable(self._att_context)
        p = self.subsampling.out.weight
        device = torch.device(device) if device is not None else p.device
        dtype = dtype or p.dtype
        B = int(batch_size)
        layers = []
        for block in self.layers:
            H, dh = block.attn.n_heads, block.attn.d_head
            layers.append(
                LayerStreamState(
                    k=torch.zeros(B, H, 0, dh, device=device, dtype=dtype),
                    v=torch.zeros(B, H, 0, dh, device=device, dtype=dtype),
                    pending=torch.zeros(B, 0, self.d_model, device=device, dtype=dtype),
                    conv_cache=block.conv.init_cache(B, device, dtype),
                    kv_start=0,
                    done=0,
                    pos=torch.zeros(0, self.d_model, device=device, dtype=dtype),
                    pos_hi=0,
                )
            )
        zeros = torch.zeros(B, dtype=torch.int64, device=device)
        return EncoderStreamState(
            batch_size=B,
            att_context_size=self._att_context,
            att_context_style=self.att_context_style,
            subsampling=self.subsampling.init_cache(B, device, dtype),
            layers=layers,
            feat_lengths=zeros,
            lengths=zeros.clone(),
            ended=(False,) * B,
            emitted=0,
        )

    def _check_state(self, state, chunk: torch.Tensor) -> None:
        if not isinstance(state, EncoderStreamState):
            raise ValueError(f"state must come from init_stream_state / stream_step, got {type(state).__name__}")
        if state.batch_size != chunk.shape[0]:
            raise ValueError(
                f"state was built for batch size {state.batch_size} but chunk has {chunk.shape[0]} rows"
            )
        if (state.att_context_size, state.att_context_style) != (self._att_context, self.att_context_style):
            raise ValueError(
                f"state was built for att_context_size={list(state.att_context_size)} ({state.att_context_style}) "
                f"but the encoder now uses {list(self._att_context)} ({self.att_context_style})"
            )
        if len(state.layers) != self.n_layers:
            raise ValueError(f"state has {len(state.layers)} layers, the encoder {self.n_layers}")
        if state.feat_lengths.device != chunk.device:
            raise ValueError(f"state is on {state.feat_lengths.device} but chunk is on {chunk.device}")

    def _stream_layers(
        self, x: torch.Tensor, layers: list[LayerStreamState], lengths: torch.Tensor, flush: bool
    ) -> tuple[torch.Tensor, list[LayerStreamState]]:
        """Push new encoder frames x (B, n, D) through all blocks; returns the frames the last block
        can output now (all queued ones when ``flush``) and the new per-layer states."""
        ctx, style = self._att_context, self.att_context_style
        left, right = ctx
        delay = right if style == "regular" else 0  # frames a query waits for at each layer
        masks = {}
        new_layers = []
        for block, st in zip(self.layers, layers):
            k, v, pending = st.k, st.v, st.pending
            if x.shape[1] > 0:
                h_new = block.pre_attention(x)
                k_new, v_new = block.keys_values(h_new)
                k, v = torch.cat([k, k_new], dim=2), torch.cat([v, v_new], dim=2)
                pending = torch.cat([pending, h_new], dim=1)
            n_q = pending.shape[1] if flush else max(0, pending.shape[1] - delay)
            n_k = k.shape[2]
            conv_cache, pos, pos_hi = st.conv_cache, st.pos, st.pos_hi
            if n_q > 0:
                key = (st.done, n_q, st.kv_start, n_k)
                if key not in masks:
                    ctx_mask = context_mask(st.done, n_q, st.kv_start, n_k, ctx, style, x.device)
                    key_pos = torch.arange(st.kv_start, st.kv_start + n_k, device=x.device)
                    masks[key] = ctx_mask.unsqueeze(0) & (key_pos.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1)
                d_hi = st.done + n_q - 1 - st.kv_start  # last query - first key
                d_lo = st.done - (st.kv_start + n_k - 1)  # first query - last key
                pos, pos_hi = self._extend_pos(block, pos, pos_hi, d_hi, d_lo)
                window = pos[pos_hi - d_hi : pos_hi - d_lo + 1]
                x, conv_cache = block.step(pending[:, :n_q], k, v, masks[key], window, conv_cache)
            else:
                x = pending[:, :0]
            done = st.done + n_q
            # Keys a future query (position >= done) may still see start at done - left.
            kv_start = st.kv_start if left < 0 else max(st.kv_start, done - left)
            drop = kv_start - st.kv_start
            new_layers.append(
                LayerStreamState(k[:, :, drop:], v[:, :, drop:], pending[:, n_q:], conv_cache, kv_start, done, pos, pos_hi)
            )
        return x, new_layers

    def _extend_pos(self, block, pos: torch.Tensor, pos_hi: int, d_hi: int, d_lo: int) -> tuple[torch.Tensor, int]:
        """Make the projected position table cover distances d_hi ... d_lo, projecting only the new rows."""
        n = pos.shape[0]
        if n == 0:
            rows = rel_position_sinusoid(d_hi, d_hi - d_lo + 1, self.d_model, pos.device, pos.dtype)
            return block.attn.project_pos(rows), d_hi
        lo = pos_hi - n + 1
        parts = []
        if d_hi > pos_hi:
            parts.append(block.attn.project_pos(rel_position_sinusoid(d_hi, d_hi - pos_hi, self.d_model, pos.device, pos.dtype)))
        parts.append(pos)
        if d_lo < lo:
            parts.append(block.attn.project_pos(rel_position_sinusoid(lo - 1, lo - d_lo, self.d_model, pos.device, pos.dtype)))
        return (torch.cat(parts) if len(parts) > 1 else pos), max(pos_hi, d_hi)

    def stream_step(
        self, chunk: torch.Tensor, chunk_lengths: torch.Tensor, state: EncoderStreamState, *, final: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, EncoderStreamState]:
        """Encode the next chunk of every row (eval mode).

        Args:
            chunk: (B, T, feat_in) with T a positive multiple of ``stream_chunk_frames()``; rows past
                their end are padding.
            chunk_lengths: (B,) integer valid frames of each row in this chunk, 0 <= chunk_lengths <= T.
                A row whose value is below T ends in this step (send 0 for an exact-length end, or
                use ``final``); rows that already ended must send 0. Read on the host (one small copy
                per step if it lives on an accelerator): it decides how many frames come out.
            state: from ``init_stream_state`` or the previous ``stream_step``; not modified.
            final: end every row in this step.
        Returns:
            out: (B, n, d_model) new encoder frames, n the same for all rows; zero beyond out_lengths.
            out_lengths: (B,) int64 how many of them are valid for each row (0 for ended rows).
            state: the new state.
        """
        if self.training:
            raise RuntimeError("stream_step needs eval mode (call enc.eval()): dropout would make streaming differ")
        self._check_feats(chunk, "chunk")
        self._check_state(state, chunk)
        B, T, _ = chunk.shape
        step = self.stream_chunk_frames()
        if T % step != 0:
            raise ValueError(
                f"chunk has {T} frames but att_context_size={list(self._att_context)} ({self.att_context_style}) "
                f"streams in multiples of stream_chunk_frames() = {step}; pad the last chunk and pass chunk_lengths"
            )
        host = _host_chunk_lengths(chunk_lengths, B, T, state.ended)
        ending = tuple(not e and (final or n < T) for e, n in zip(state.ended, host))
        ended = tuple(e or n for e, n in zip(state.ended, ending))
        flush_all = all(ended)

        cl = torch.tensor(host, dtype=torch.int64, device=chunk.device)
        x, sub_cache = self.subsampling.step(chunk, cl, state.subsampling)
        feat_lengths = state.feat_lengths + cl
        lengths = self.subsampling.output_lengths(feat_lengths)
        y, layers = self._stream_layers(x, state.layers, lengths, flush=flush_all)
        n_out = y.shape[1]
        if any(ending) and not flush_all and any(st.pending.shape[1] for st in layers):
            # Rows that end now get their queued frames from a flush of a copy of the state; the rows
            # that go on keep the unflushed state (their queued frames still wait for lookahead).
            y_flush, _ = self._stream_layers(x[:, :0], layers, lengths, flush=True)
            y = torch.cat([y, y_flush], dim=1)
        limit = torch.tensor(
            [0 if e else (y.shape[1] if n else n_out) for e, n in zip(state.ended, ending)],
            dtype=torch.int64,
            device=chunk.device,
        )
        out_lengths = torch.minimum((lengths - state.emitted).clamp(min=0), limit)
        y = y.masked_fill(~valid_mask(out_lengths, y.shape[1]).unsqueeze(-1), 0.0)
        new_state = EncoderStreamState(
            batch_size=B,
            att_context_size=state.att_context_size,
            att_context_style=state.att_context_style,
            subsampling=sub_cache,
            layers=layers,
            feat_lengths=feat_lengths,
            lengths=lengths,
            ended=ended,
            emitted=state.emitted + n_out,
        )
        return y, out_lengths, new_state

    @torch.no_grad()
    def forward_streaming(self, feats: torch.Tensor, lengths: torch.Tensor, chunks_per_step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a padded batch through ``stream_step`` chunk by chunk; same outputs as ``forward`` in eval.

        For checking a model and for simulating streaming on files. Args as ``forward``;
        ``chunks_per_step`` multiplies ``stream_chunk_frames()``. Returns (out, out_lengths) like forward.
        """
        self._check_feats(feats, "feats")
        B, T, _ = feats.shape
        lengths = self._check_lengths(lengths, B, T, "lengths", feats.device)
        if isinstance(chunks_per_step, bool) or not isinstance(chunks_per_step, numbers.Integral) or chunks_per_step < 1:
            raise ValueError(f"chunks_per_step must be an int >= 1, got {chunks_per_step!r}")
        step = self.stream_chunk_frames() * int(chunks_per_step)
        n_steps = -(-T // step)
        feats = torch.nn.functional.pad(feats, (0, 0, 0, n_steps * step - T))
        state = self.init_stream_state(B, feats.device, feats.dtype)
        out = feats.new_zeros(B, -(-T // self.subsampling_factor), self.d_model)
        written = [0] * B
        for s in range(n_steps):
            cl = (lengths - s * step).clamp(0, step)
            y, yl, state = self.stream_step(feats[:, s * step : (s + 1) * step], cl, state, final=s == n_steps - 1)
            for b, n in enumerate(yl.tolist()):
                out[b, written[b] : written[b] + n] = y[b, :n]
                written[b] += n
        return out, self.subsampling.output_lengths(lengths)


def _host_chunk_lengths(chunk_lengths, B: int, T: int, ended: tuple[bool, ...]) -> list[int]:
    """``stream_step``'s chunk_lengths checked and read to the host, as a list of B ints."""
    if not isinstance(chunk_lengths, torch.Tensor) or chunk_lengths.shape != (B,) or chunk_lengths.is_floating_point():
        raise ValueError(f"chunk_lengths must be a ({B},) integer tensor, got {getattr(chunk_lengths, 'shape', chunk_lengths)}")
    host = chunk_lengths.tolist()
    if any(n < 0 or n > T for n in host):
        raise ValueError(f"chunk_lengths must be in [0, {T}] (the chunk's frames), got {host}")
    if any(e and n > 0 for e, n in zip(ended, host)):
        raise ValueError(f"chunk_lengths must be 0 for rows that already ended ({list(ended)}), got {host}")
    return host
