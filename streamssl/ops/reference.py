"""Pure-PyTorch reference implementations of the streamssl ops.

This file is the spec in code (docs/ARCHITECTURE.md, "The fused ops"): readable, loop-friendly, and the fallback
when no C++ compiler is available. The C++ and CUDA kernels are tested against it. It favours
clarity over speed; the masking reference synchronises with the host, which the kernels never do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and int64 tensor b < 2**32.

    The product is assembled from 16-bit halves so no intermediate leaves int64's range.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    mid = a_hi * b_lo + a_lo * b_hi  # < 2**33
    low = a_lo * b_lo + ((mid & 0xFFFF) << 16)  # < 2**33
    high = a_hi * b_hi + (mid >> 16) + (low >> 32)
    return high & _M32, low & _M32


def philox4x32_10(counter: tuple, key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 values.

    Args:
        counter: four int64 tensors (or ints), broadcastable, each in [0, 2**32).
        key: two ints in [0, 2**32).
    Returns:
        the four output words as int64 tensors in [0, 2**32).
    """
    c = [torch.as_tensor(w, dtype=torch.int64) for w in counter]
    c = list(torch.broadcast_tensors(*c))
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c[0])
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + _PHILOX_WEYL[0]) & _M32
        k1 = (k1 + _PHILOX_WEYL[1]) & _M32
    return c


def mask_uniforms(seed: int, offset: int, b: int, starts: torch.Tensor) -> torch.Tensor:
    """u(b, s) of the masking rule for the frames `starts` (int64, CPU) of utterance b: float64."""
    seed %= 2**64
    words = philox4x32_10((offset % 2**32, b, starts, 0), (seed & _M32, seed >> 32))
    return (words[0] >> 8).to(torch.float64) * 2.0**-24


def causal_block_mask(
    feats: torch.Tensor,
    lengths: torch.Tensor,
    mask_embedding: torch.Tensor,
    seed: int,
    offset: int = 0,
    *,
    mask_prob: float = 0.01,
    block_size: int = 40,
    min_start: int = 16,
    left_context: int = -1,
    max_mask_ratio: float = 0.8,
    align: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal block masking, written as the rule reads (docs/ARCHITECTURE.md, "The fused ops").

    Args:
        feats: (B, T, F) float tensor.
        lengths: (B,) int64 valid frames per utterance.
        mask_embedding: (F,) the vector written into masked frames.
        seed, offset: the mask is a pure function of (seed, offset, b, t, lengths).
    Returns:
        masked: (B, T, F) new tensor, feats with masked frames replaced by mask_embedding.
        mask: (B, T) bool, True where masked.
    """
    B, T, _ = feats.shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, length in enumerate(lengths.cpu().tolist()):
        L = min(max(length, 0), T)
        first = max(min_start, 0)
        first = -(-first // align) * align  # smallest multiple of align >= first
        if first >= L:  # torch.arange refuses first > L
            continue
        frames = torch.arange(first, L, align, dtype=torch.int64)
        starts = frames[mask_uniforms(seed, offset, b, frames) < mask_prob].tolist()
        row = mask[b]
        for s in starts:  # increasing s
            e = min(s + block_size, L)
            w = min(left_context, e) if left_context > 0 else e
            trial = row.clone()
            trial[s:e] = True
            if int(trial[e - w : e].sum()) <= math.floor(max_mask_ratio * w):
                row.copy_(trial)
    mask = mask.to(feats.device)
    masked = torch.where(mask.unsqueeze(-1), mask_embedding.to(feats.dtype), feats)
    return masked, mask


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for float32/float16/bfloat16 (the ops' accumulation)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_dwconv_ln(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    cache: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    activation: str | None = "swish",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time, LayerNorm over channels, Swish: the composition.

    Args:
        x: (B, T, C). weight: (C, K). bias: (C,) or None. ln_weight, ln_bias: (C,).
        cache: (B, K-1, C), the K-1 frames before x; None means zeros.
    Returns:
        y: (B, T, C) in x's dtype (float32 accumulation; float64 for float64 inputs).
        new_cache: (B, K-1, C), the last K-1 frames of cat(cache, x) (no gradient).
    """
    B, T, C = x.shape
    K = weight.shape[1]
    if cache is None:
        cache = x.new_zeros(B, K - 1, C)
    xp = torch.cat([cache.detach().to(x.dtype), x], dim=1)  # (B, T + K - 1, C)
    acc = accumulation_dtype(x.dtype)
    z = F.conv1d(
        xp.to(acc).transpose(1, 2),
        weight.to(acc).unsqueeze(1),
        None if bias is None else bias.to(acc),
        groups=C,
    ).transpose(1, 2)
    h = F.layer_norm(z, (C,), ln_weight.to(acc), ln_bias.to(acc), eps)
    y = F.silu(h) if activation == "swish" else h
    return y.to(x.dtype), xp[:, T:].detach().clone()


def _stride2_conv(x: torch.Tensor, w: torch.Tensor, time_padding: int, groups: int) -> torch.Tensor:
    """3x3 stride-2 conv of x (B, C_in, T, F), ``time_padding`` zeros around time, one around frequency."""
    return F.conv2d(F.pad(x, (1, 1, time_padding, time_padding)), w, stride=2, groups=groups)


def subsampling_stem_backward(
    grad_y1: torch.Tensor, y0: torch.Tensor, feats: torch.Tensor, w1: torch.Tensor, time_padding: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parameter gradients of the subsampling's first two stages, by autograd through their composition.

    ``y0 = relu(conv3x3_s2(feats, w0) + b0) * keep`` and ``y1 = dwconv3x3_s2(y0, w1) + b1``
    (``time_padding`` zero frames on both sides of time, one zero bin around frequency); y0 is
    given, so neither w0, b0 nor keep is needed: the ReLU passes the gradient where y0 > 0.

    Args (channels last, one dtype): grad_y1 (B, T1, F1, C), y0 (B, T0, F0, C), feats (B, T, F),
        w1 (C, 3, 3).
    Returns:
        grad_w0 (C, 3, 3), grad_b0 (C,), grad_w1 (C, 3, 3).
    """
    C = y0.shape[3]
    if grad_y1.numel() == 0:  # no stage-1 output (too few frames or bins): nothing to differentiate
        z = feats.new_zeros(C, 3, 3)
        return z, feats.new_zeros(C), z.clone()
    with torch.enable_grad():
        y = y0.permute(0, 3, 1, 2).detach().requires_grad_()
        w = w1.detach().reshape(C, 1, 3, 3).requires_grad_()
        out1 = _stride2_conv(y, w, time_padding, C)
        grad_y0, grad_w1 = torch.autograd.grad(out1, (y, w), grad_y1.permute(0, 3, 1, 2))
        g0 = torch.where(y > 0, grad_y0, 0.0)
        # Stage 0 is linear in (w0, b0): its weight and bias gradients do not depend on them.
        w0 = torch.zeros(C, 1, 3, 3, dtype=feats.dtype, device=feats.device, requires_grad=True)
        b0 = torch.zeros(C, dtype=feats.dtype, device=feats.device, requires_grad=True)
        out0 = _stride2_conv(feats.unsqueeze(1), w0, time_padding, 1) + b0[:, None, None]
        grad_w0, grad_b0 = torch.autograd.grad(out0, (w0, b0), g0)
    return grad_w0.reshape(C, 3, 3), grad_b0, grad_w1.reshape(C, 3, 3)


def dropout_words(numel: int, seed: int, device=None) -> torch.Tensor:
    """The Philox word of each element of the dropout rule: int64 (numel,) in [0, 2**32).

    Element n = 32 g + 8 j + l takes word j of Philox block 8 g + l (counter (block mod 2**32,
    block div 2**32, 0, 0), key (seed mod 2**32, seed div 2**32)).
    """
    seed %= 2**64
    groups = -(-numel // 32)
    block = torch.arange(groups * 8, dtype=torch.int64, device=device)
    words = philox4x32_10((block & _M32, block >> 32, 0, 0), (seed & _M32, seed >> 32))
    # (4 words, G groups, 8 lanes) -> element order (G, 4, 8).
    return torch.stack(words).view(4, groups, 8).permute(1, 0, 2).reshape(-1)[:numel]


def dropout_factors(numel: int, p: float, seed: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The per-element factor of the dropout rule in ``dtype``: 1 / (1 - p) where kept, else 0.

    Kept iff word * 2**-32 >= p, i.e. word >= ceil(p * 2**32) (exact: a power-of-two scaling);
    for p > 1 - 2**-32 no word qualifies and every factor is 0.
    """
    threshold = math.ceil(p * 2.0**32)
    scale = 1.0 / (1.0 - p) if threshold < 2**32 else 0.0
    keep = dropout_words(numel, seed, device) >= threshold
    # The scale is rounded once to dtype, as the kernels' static_cast does.
    return torch.where(keep, torch.tensor(scale, dtype=dtype, device=device), torch.tensor(0.0, dtype=dtype, device=device))


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Counter-based dropout (docs/ARCHITECTURE.md, "The fused ops"): x times its element's factor.

    The product runs in float32 for float16/bfloat16/float32 and in float64 for float64, and a
    dropped element is multiplied by 0 (NaN stays NaN). Differentiable: the gradient is the same
    rule applied to the incoming gradient.
    """
    acc = accumulation_dtype(x.dtype)
    factors = dropout_factors(x.numel(), p, seed, acc, x.device).view(x.shape)
    return (x.to(acc) * factors).to(x.dtype)
