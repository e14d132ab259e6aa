"""causal_dwconv_ln: cached causal depthwise conv + LayerNorm + Swish (DESIGN.md)."""

from __future__ import annotations

import torch

from . import reference
from ._args import _FLOATS, check_tensor


def _check_args(x, weight, bias, ln_weight, ln_bias, cache, activation):
    check_tensor(x, "x", dim=3, dtypes=_FLOATS)
    B, _, C = x.shape
    check_tensor(weight, "weight", dim=2, dtypes=_FLOATS, device=x.device)
    if weight.shape[0] != C:
        raise ValueError(f"weight must have shape (C, K) with C = {C} (x's channels), got {tuple(weight.shape)}")
    K = weight.shape[1]
    if K < 1:
        raise ValueError(f"weight must have K >= 1 taps, got shape {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None and name == "bias":
            continue
        check_tensor(t, name, dim=1, dtypes=_FLOATS, device=x.device)
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape (C,) = ({C},), got {tuple(t.shape)}")
    if cache is not None:
        check_tensor(cache, "cache", dim=3, dtypes=_FLOATS, device=x.device)
        if tuple(cache.shape) != (B, K - 1, C):
            raise ValueError(f"cache must have shape (B, K-1, C) = ({B}, {K - 1}, {C}), got {tuple(cache.shape)}")
    if activation not in ("swish", None):
        raise ValueError(f"activation must be 'swish' or None, got {activation!r}")


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
    """Causal depthwise conv over time, then LayerNorm over channels, then Swish.

    Args:
        x: (B, T, C) float32 / bfloat16 / float16 / float64.
        weight: (C, K) depthwise taps; bias: (C,) or None.
        ln_weight, ln_bias: (C,) LayerNorm affine parameters.
        cache: (B, K-1, C), the K-1 frames before x (None: zeros). No gradient flows into it.
        eps: LayerNorm epsilon. activation: "swish" or None.
    Returns:
        y: (B, T, C) in x's dtype (float32 accumulation; float64 for float64).
        new_cache: (B, K-1, C), the last K-1 frames of cat(cache, x): pass it with the next chunk.
    """
    _check_args(x, weight, bias, ln_weight, ln_bias, cache, activation)
    return reference.causal_dwconv_ln(x, weight, bias, ln_weight, ln_bias, cache, eps=eps, activation=activation)
