"""Causal depthwise-striding subsampling (FastConformer style), full-sequence and streaming.

Stages, each halving time and frequency with a 3x3 kernel and stride 2:
``Conv2d(1, C) → ReLU``, then ``(depthwise Conv2d(C, C, groups=C) → pointwise Conv2d(C, C, 1) → ReLU)``
for every further factor of 2; then the (C × F') map of each frame is flattened and a Linear maps it
to d_model.

Causal in time, aligned to groups of ``factor`` frames: each stage pads one zero frame on the left
and one on the right, so output frame t of a stage reads its input frames 2t - 1, 2t, 2t + 1. Hence:

* ``ceil(T / 2)`` output frames per stage and ``T' = ceil(T / factor)`` overall (factor 8: 8x);
* encoder frame t reads feature frames 8t - 7 ... 8t + 7: its own group [8t, 8t + 8) and the 7
  frames before it, never a later group. It exists as soon as feature frame 8t + 7 has arrived; the
  last, partial group of an utterance reads zeros past the end (padding is zeroed), which is what
  a streaming step sees too, so it is emitted in the final step;
* a streaming chunk of ``factor * c`` feature frames (starting at a multiple of ``factor``) yields
  exactly the c encoder frames of its groups when each stage keeps its last input frame as a cache
  (every stage then sees an even count, so the right padding is never needed while streaming).

Frequency is padded by one bin on both sides (frequency is not time; no causality needed there).
Padded time frames are zeroed before every stage so nothing in the padding reaches valid frames.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

_KERNEL, _STRIDE = 3, 2
_CACHE = 1  # input frames of left context per stage (kernel 3 centred on 2t: 2t - 1 ... 2t + 1)


@contextlib.contextmanager
def _convolutions_in_float32(x: torch.Tensor):
    """Yields the dtype the convolution stages run in: x's, or float32 under CPU autocast.

    oneDNN's bfloat16 backward of these stride-2 and depthwise convolutions was ~8x slower than its
    float32 one on an AMX Xeon (bench/RESULTS.md), so with CPU autocast on the stages run in float32
    with autocast off (which also lets the fused stem backward serve); the projection after them
    follows autocast. On CUDA autocast applies as usual.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            yield torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    else:
        yield x.dtype


def _ceil_div(x, d: int):
    return -(-x // d)



def _zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (B, C, T, F) with the frames at and after ``lengths`` (B,) set to zero, whatever they held.

    ``torch.where`` rather than ``masked_fill``: the same values, but masked_fill's backward on a
    channels_last tensor cost about 3x more than the whole fill (bench/RESULTS.md, the NEST-step
    profile).
    """
    return torch.where(_valid(x.shape[2], lengths), x, 0.0)


class _ReluKeep(torch.autograd.Function):
    """relu(x) * keep for a 0/1 float ``keep`` that broadcasts over x, written into x.

    A stage's ReLU and the zeroing of the next stage's padded frames in one place: two in-place
    passes forward and one select backward, where a ReLU followed by a multiply costs a new map
    and two backward passes over these large channels_last maps. Since keep is 0 or 1, the result
    is positive exactly where x > 0 and keep = 1, which is where the gradient passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        y = x.clamp_min_(0).mul_(keep)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0), None


class _Stem(torch.autograd.Function):
    """The first two stages (conv → ReLU·keep → depthwise conv) with the fused parameter backward.

    Forward: the same convolutions and ReLU as ``_stage`` (bit-identical output). Backward:
    ``ops.subsampling_stem_backward`` gives the gradients of w0, b0 and w1 in one pass over the
    stage-0 map, without writing that map's gradient (the features take none: the caller uses
    this path only when they do not require grad); b1's gradient is grad_y1's sum.
    """

    @staticmethod
    def forward(ctx, feats, w0, b0, keep, w1, b1, time_padding: int):
        y0 = F.conv2d(feats, w0, b0, _STRIDE, (time_padding, 1))
        y0 = y0.clamp_min_(0).mul_(keep)
        ctx.save_for_backward(feats, y0, w0, w1)
        ctx.time_padding = time_padding
        return F.conv2d(y0, w1, b1, _STRIDE, (time_padding, 1), 1, w1.shape[0])

    @staticmethod
    def backward(ctx, grad_y1):
        from streamssl.ops import subsampling_stem_backward

        feats, y0, w0, w1 = ctx.saved_tensors
        C = w1.shape[0]
        gw0, gb0, gw1 = subsampling_stem_backward(
            grad_y1.permute(0, 2, 3, 1), y0.permute(0, 2, 3, 1), feats[:, 0], w1.reshape(C, 3, 3), ctx.time_padding
        )
        # Gradients with their parameters' exact strides, as DDP's gradient buckets expect (for
        # (C, 1, 3, 3) the channels_last strides differ from the contiguous ones only in name).
        gw0 = torch.empty_like(w0).copy_(gw0.view(w0.shape))
        gw1 = torch.empty_like(w1).copy_(gw1.view(w1.shape))
        return None, gw0, gb0, None, gw1, grad_y1.sum((0, 2, 3)), None


def _valid(frames: int, lengths: torch.Tensor) -> torch.Tensor:
    """(B, 1, frames, 1) bool on lengths' device: frame t of row b is before ``lengths[b]``."""
    return (torch.arange(frames, device=lengths.device) < lengths.unsqueeze(1))[:, None, :, None]


class CausalStridingSubsampling(nn.Module):
    """Causal ``factor``x subsampling of (B, T, feat_in) features to (B, ceil(T / factor), d_model).

    Args:
        feat_in: feature bins F per frame.
        d_model: output width.
        factor: time (and frequency) reduction, a power of two >= 2.
        channels: conv channels C.
    """

    def __init__(self, feat_in: int, d_model: int, factor: int = 8, channels: int = 256):
        super().__init__()
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"subsampling_factor must be a power of two >= 2, got {factor}")
        if channels < 1:
            raise ValueError(f"subsampling_channels must be >= 1, got {channels}")
        if feat_in < 1:
            raise ValueError(f"feat_in must be >= 1, got {feat_in}")
        self.feat_in, self.d_model, self.factor, self.channels = feat_in, d_model, factor, channels
        n_stages = factor.bit_length() - 1
        convs = [nn.Conv2d(1, channels, _KERNEL, stride=_STRIDE, padding=(0, 1))]
        pointwise = [None]
        for _ in range(n_stages - 1):
            convs.append(nn.Conv2d(channels, channels, _KERNEL, stride=_STRIDE, padding=(0, 1), groups=channels))
            pointwise.append(nn.Conv2d(channels, channels, 1))
        self.convs = nn.ModuleList(convs)
        self.pointwise = nn.ModuleList([nn.Identity() if p is None else p for p in pointwise])
        # The stages run in channels_last (see _stage); weights in the same layout get their
        # gradients in it too, which DDP's gradient buckets expect.
        for s in range(n_stages):
            self.convs[s].to(memory_format=torch.channels_last)
            self.pointwise[s].to(memory_format=torch.channels_last)
        f = feat_in
        self.stage_freqs = []  # frequency bins entering each stage
        for _ in range(n_stages):
            self.stage_freqs.append(f)
            f = _ceil_div(f, 2)
        self.out = nn.Linear(channels * f, d_model)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """ceil(lengths / factor), elementwise (int64 tensor in, int64 tensor out)."""
        return _ceil_div(lengths, self.factor)

    def _stage(self, s: int, x: torch.Tensor, time_padding: int, keep_lengths: torch.Tensor | None = None) -> torch.Tensor:
        # Every stage runs in channels_last: PyTorch's CPU kernels for the depthwise 3x3 and the
        # pointwise convolutions are about 2x faster forward+backward in it than in NCHW, and one
        # layout from the first stage on keeps the ReLU, padding and masking backwards from
        # converting between layouts (1.5x on the subsampling's forward+backward; bench/RESULTS.md).
        # The result is the same up to float32 summation order. The full pass lets the convolution
        # pad time (one zero frame each side) instead of copying the map into a padded one.
        x = x.contiguous(memory_format=torch.channels_last)
        c = self.convs[s]
        x = F.conv2d(x, c.weight, c.bias, c.stride, (time_padding, 1), c.dilation, c.groups)
        return self._pointwise_relu(s, x, keep_lengths)

    def _pointwise_relu(self, s: int, x: torch.Tensor, keep_lengths: torch.Tensor | None) -> torch.Tensor:
        """Stage s after its strided conv: pointwise conv (stages >= 1), then the ReLU, in place (its
        backward reads its output, and nothing else holds the conv output). With keep_lengths, the
        output's frames from keep_lengths on are zeroed as well."""
        x = self.pointwise[s](x)
        if keep_lengths is None:
            return F.relu(x, inplace=True)
        return _ReluKeep.apply(x, _valid(x.shape[2], keep_lengths).to(x.dtype))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, Fq = x.shape
        return self.out(x.permute(0, 2, 1, 3).reshape(B, T, C * Fq))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F), lengths (B,) int64 -> (B, ceil(T / factor), d_model), ceil(lengths / factor).

        Padded output frames are not zeroed here (the encoder masks them); valid ones read only valid
        frames and zeros.
        """
        # The features' padding may hold anything (a caller's own tensor): select zeros there.
        # Each stage but the last zeroes its own padded output frames (the next stage's input),
        # together with its ReLU; those frames are finite, made from zeroed input.
        with _convolutions_in_float32(feats) as dtype:
            x = _zero_padding(feats.unsqueeze(1).to(dtype), lengths)  # (B, 1, T, F)
            last = len(self.convs) - 1
            first = 0
            if self._fused_stem_applies(x):
                x, lengths = self._stem(x, lengths, last)
                first = 2
            for s in range(first, len(self.convs)):
                lengths = _ceil_div(lengths, 2)
                x = self._stage(s, x, _CACHE, None if s == last else lengths)
        return self._project(x), lengths

    def _fused_stem_applies(self, x: torch.Tensor) -> bool:
        """Whether stages 0 and 1 train through ``_Stem``: in training mode, their weights need
        gradients, the features do not, there are two stages or more, and the dtype is one the op
        takes. Evaluation always runs stage by stage (the same forward, without the saved map)."""
        if not self.training or len(self.convs) < 2 or not torch.is_grad_enabled() or x.requires_grad:
            return False
        if x.dtype not in (torch.float32, torch.float64):
            return False
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            return False  # the convolutions would run in a reduced dtype the op does not take
        from streamssl.ops import uses_extension

        params = (self.convs[0].weight, self.convs[0].bias, self.convs[1].weight, self.convs[1].bias)
        return any(p.requires_grad for p in params) and uses_extension(x)

    def _stem(self, x: torch.Tensor, lengths: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 0 and 1 of the full pass through ``_Stem`` (the outputs of two ``_stage`` calls)."""
        lengths0 = _ceil_div(lengths, 2)
        keep0 = _valid(_ceil_div(x.shape[2], 2), lengths0).to(x.dtype)
        c0, c1 = self.convs[0], self.convs[1]
        x = _Stem.apply(x.contiguous(memory_format=torch.channels_last), c0.weight, c0.bias, keep0,
                        c1.weight, c1.bias, _CACHE)
        lengths = _ceil_div(lengths0, 2)
        return self._pointwise_relu(1, x, None if last == 1 else lengths), lengths

    def init_cache(self, batch_size: int, device=None, dtype=None) -> list[torch.Tensor]:
        """Zeros for each stage's last input frame: [(B, 1, 1, F), (B, C, 1, ceil(F/2)), ...]."""
        p = self.out.weight
        device, dtype = device or p.device, dtype or p.dtype
        return [
            torch.zeros(batch_size, 1 if s == 0 else self.channels, _CACHE, f, device=device, dtype=dtype)
            for s, f in enumerate(self.stage_freqs)
        ]

    def step(
        self, chunk: torch.Tensor, chunk_lengths: torch.Tensor, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Streaming step over a chunk whose length is a multiple of ``factor``.

        Args:
            chunk: (B, factor * c, F) the next feature frames.
            chunk_lengths: (B,) int64 valid frames in the chunk (frames after them are zeroed, as the
                full pass zeroes padding).
            cache: from ``init_cache`` or the previous step.
        Returns:
            (B, c, d_model) the encoder frames whose last input frame is in this chunk, and the new cache.
        """
        lengths = chunk_lengths
        new_cache = []
        with _convolutions_in_float32(chunk) as dtype:
            x = chunk.unsqueeze(1).to(dtype)
            for s in range(len(self.convs)):
                x = torch.cat([cache[s].to(x.dtype), _zero_padding(x, lengths)], dim=2)
                new_cache.append(x[:, :, -_CACHE:].detach())
                x = self._stage(s, x, 0)
                lengths = _ceil_div(lengths, 2)
        return self._project(x), new_cache
