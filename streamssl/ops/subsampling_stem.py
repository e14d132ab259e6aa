"""subsampling_stem_backward: the fused backward of the subsampling's first two stages.

The striding subsampling's stem is ``y0 = relu(conv3x3_s2(feats) + b0) * keep`` (1 -> C channels)
then ``y1 = depthwise_conv3x3_s2(y0) + b1``; y0 is the largest map of the encoder (B, C, T/2, F/2).
Autograd's backward of that pair writes the gradient of y0, gates it with the ReLU and reads it
again for the stage-0 weight gradient: three passes over the map. This op computes the parameter
gradients in one pass over y0 without writing its gradient (the features take none). The
forward stays PyTorch's: its convolution, ReLU and mask already run near the memory floor of
writing y0 (a fused forward kernel was measured slower, bench/RESULTS.md).
``streamssl.nn.subsampling`` calls it from its autograd function when it trains; the reference
(``reference.subsampling_stem_backward``) is autograd through the composition.

Op schema (csrc/ops.cpp)::

    subsampling_stem_backward(Tensor grad_y1, Tensor y0, Tensor feats, Tensor w1, int time_padding)
        -> (Tensor grad_w0, Tensor grad_b0, Tensor grad_w1)
"""

from __future__ import annotations

import torch

from . import reference
from ._args import check_tensor

_DTYPES = (torch.float32, torch.float64)


def _out_size(n: int, pad: int) -> int:
    return 0 if n + 2 * pad < 3 else (n + 2 * pad - 3) // 2 + 1


def _check_args(grad_y1, y0, feats, w1, time_padding) -> None:
    """ValueError/TypeError naming the argument; shared by the function and the fake kernel."""
    if time_padding not in (0, 1):
        raise ValueError(f"time_padding must be 0 or 1, got {time_padding!r}")
    check_tensor(feats, "feats", dim=3, dtypes=_DTYPES)
    check_tensor(y0, "y0", dim=4, dtypes=(feats.dtype,), device=feats.device)
    check_tensor(grad_y1, "grad_y1", dim=4, dtypes=(feats.dtype,), device=feats.device)
    check_tensor(w1, "w1", dim=3, dtypes=(feats.dtype,), device=feats.device)
    B, T, Fq = feats.shape
    C = y0.shape[3]
    if C < 1:
        raise ValueError(f"y0 must have at least one channel, got shape {tuple(y0.shape)}")
    T0, F0 = _out_size(T, time_padding), _out_size(Fq, 1)
    if tuple(y0.shape) != (B, T0, F0, C):
        raise ValueError(f"y0 must have shape (B, T0, F0, C) = {(B, T0, F0, C)} for feats of shape "
                         f"{tuple(feats.shape)} and time_padding {time_padding}, got {tuple(y0.shape)}")
    T1, F1 = _out_size(T0, time_padding), _out_size(F0, 1)
    if tuple(grad_y1.shape) != (B, T1, F1, C):
        raise ValueError(f"grad_y1 must have shape (B, T1, F1, C) = {(B, T1, F1, C)}, got {tuple(grad_y1.shape)}")
    if tuple(w1.shape) != (C, 3, 3):
        raise ValueError(f"w1 must have shape (C, 3, 3) = {(C, 3, 3)}, got {tuple(w1.shape)}")


def subsampling_stem_backward(
    grad_y1: torch.Tensor, y0: torch.Tensor, feats: torch.Tensor, w1: torch.Tensor, time_padding: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_w0, grad_b0, grad_w1 of the stem (see the module docstring), in one pass over y0.

    Args (channels last, all float32 or all float64, any strides):
        grad_y1: (B, T1, F1, C) gradient of the depthwise stage's output.
        y0: (B, T0, F0, C) the stage-0 output (after its ReLU and padding mask).
        feats: (B, T, F) the stem's input, padding already zeroed.
        w1: (C, 3, 3) the depthwise taps.
        time_padding: zero frames on both sides of time in both stages (1 in the full pass).
        Sizes: T0 = (T + 2p - 3) // 2 + 1, F0 = (F - 1) // 2 + 1, T1 and F1 likewise from T0, F0.
    Returns:
        grad_w0 (C, 3, 3), grad_b0 (C,), grad_w1 (C, 3, 3) in feats' dtype. The sums run in a
        fixed order: the same bits on every run and thread count.
    """
    from . import uses_extension

    if not uses_extension(feats):
        _check_args(grad_y1, y0, feats, w1, time_padding)
        return reference.subsampling_stem_backward(grad_y1, y0, feats, w1, time_padding)
    return torch.ops.streamssl.subsampling_stem_backward(grad_y1, y0, feats, w1, int(time_padding))


def register_library_parts() -> None:
    """The fake kernel of streamssl::subsampling_stem_backward (library loaded)."""

    @torch.library.register_fake("streamssl::subsampling_stem_backward")
    def _fake(grad_y1, y0, feats, w1, time_padding):
        _check_args(grad_y1, y0, feats, w1, time_padding)
        C = y0.shape[3]
        return feats.new_empty((C, 3, 3)), feats.new_empty((C,)), feats.new_empty((C, 3, 3))
