"""causal_dwconv_ln: cached causal depthwise conv + LayerNorm + Swish (docs/ARCHITECTURE.md).

The public function calls ``torch.ops.streamssl.causal_dwconv_ln`` (C++ and CUDA kernels), or the
pure-PyTorch reference when the extension does not serve the device. Either way bad arguments
raise ValueError naming the argument: the op checks them in C++ (csrc/ops.cpp) and in its fake
kernel, the reference path with ``_check_args`` below.

Op schemas (csrc/ops.cpp)::

    causal_dwconv_ln(Tensor x, Tensor weight, Tensor? bias, Tensor ln_weight, Tensor ln_bias,
                     Tensor? cache, float eps, bool swish)
        -> (Tensor y, Tensor new_cache, Tensor mean, Tensor rstd)
    causal_dwconv_ln_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias,
                              Tensor ln_weight, Tensor ln_bias, Tensor? cache, Tensor mean,
                              Tensor rstd, bool swish)
        -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_ln_weight,
            Tensor grad_ln_bias)

mean and rstd are the LayerNorm statistics of each frame (B, T), float32 (float64 for float64 x):
the forward saves them so that the backward recomputes only the conv. Autograd is registered on
the forward op with the backward op; the cache, new_cache, mean and rstd get no gradient.
"""

from __future__ import annotations

import math

import torch

from . import reference
from .reference import accumulation_dtype
from ._args import _FLOATS, check_tensor

_REDUCED = (torch.float16, torch.bfloat16)


def _param_dtypes(x_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    # Parameters are read in the accumulation type: x's dtype, or float32 master weights for
    # float16/bfloat16 activations (what autocast training hands the op).
    return (x_dtype, torch.float32) if x_dtype in _REDUCED else (x_dtype,)


def _check_args(x, weight, bias, ln_weight, ln_bias, cache, eps=1e-5) -> None:
    """Raise ValueError/TypeError naming the argument; shared by the function and the fake kernel."""
    check_tensor(x, "x", dim=3, dtypes=_FLOATS)
    B, _, C = x.shape
    if C < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    pdt = _param_dtypes(x.dtype)
    check_tensor(weight, "weight", dim=2, dtypes=pdt, device=x.device)
    if weight.shape[0] != C:
        raise ValueError(f"weight must have shape (C, K) with C = {C} (x's channels), got {tuple(weight.shape)}")
    K = weight.shape[1]
    if K < 1:
        raise ValueError(f"weight must have K >= 1 taps, got shape {tuple(weight.shape)}")
    if K > 1024:
        raise ValueError(f"weight has K = {K} taps; at most 1024 are supported")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None and name == "bias":
            continue
        check_tensor(t, name, dim=1, dtypes=pdt, device=x.device)
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape (C,) = ({C},), got {tuple(t.shape)}")
    if cache is not None:
        check_tensor(cache, "cache", dim=3, dtypes=(x.dtype,), device=x.device)
        if tuple(cache.shape) != (B, K - 1, C):
            raise ValueError(f"cache must have shape (B, K-1, C) = ({B}, {K - 1}, {C}), got {tuple(cache.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


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

    ``xp = cat(cache, x)`` on time; ``z[b, t, c] = bias[c] + sum_j weight[c, j] * xp[b, t + j, c]``;
    ``y = swish(LayerNorm_C(z) * ln_weight + ln_bias)``. Feeding chunks one after another with the
    returned cache gives exactly the slices of the full-sequence output.

    Args:
        x: (B, T, C) float32 / bfloat16 / float16 / float64; T >= 0, C >= 1. Any strides.
        weight: (C, K) depthwise taps, K >= 1; bias: (C,) or None.
        ln_weight, ln_bias: (C,) LayerNorm affine parameters.
            Parameters have x's dtype, or float32 when x is float16/bfloat16.
        cache: (B, K-1, C) in x's dtype, the K-1 frames before x (None: zeros). No gradient flows
            into it.
        eps: LayerNorm epsilon (>= 0). activation: "swish" or None.
    Returns:
        y: (B, T, C) in x's dtype (float32 accumulation; float64 for float64).
        new_cache: (B, K-1, C) in x's dtype, the last K-1 frames of cat(cache, x): pass it with
        the next chunk.
    Gradients flow to x, weight, bias, ln_weight and ln_bias (each in its own dtype).
    """
    if activation not in ("swish", None):
        raise ValueError(f"activation must be 'swish' or None, got {activation!r}")
    if not _extension_serves(x):
        _check_args(x, weight, bias, ln_weight, ln_bias, cache, eps)
        return reference.causal_dwconv_ln(x, weight, bias, ln_weight, ln_bias, cache, eps=eps, activation=activation)
    # The op checks its arguments itself (csrc/ops.cpp, and the fake kernel), with messages that
    # name them; checking here too would double the cost of a streaming step.
    args = (x, weight, bias, ln_weight, ln_bias, cache, float(eps), activation == "swish")
    if _needs_autograd(args):
        y, new_cache, _, _ = torch.ops.streamssl.causal_dwconv_ln(*args)
    else:
        # Nothing to differentiate: skip the Python autograd kernel (it would only redispatch).
        with torch._C._AutoDispatchBelowAutograd():
            y, new_cache, _, _ = torch.ops.streamssl.causal_dwconv_ln(*args)
    return y, new_cache


def _extension_serves(x) -> bool:
    """ops.uses_extension(x), trimmed for the streaming step's budget of microseconds."""
    from . import backend

    name = backend()
    if name == "reference" or not isinstance(x, torch.Tensor):
        return False
    if x.is_cpu or x.is_meta:
        return True
    return x.is_cuda and name == "cuda+cpu"


def _needs_autograd(args) -> bool:
    if torch.compiler.is_compiling():
        return True  # let the compiler see the op with its autograd formula
    if not torch.is_grad_enabled():
        return False
    for t in args[:5]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def register_library_parts() -> None:
    """Fake kernels and the autograd formula of streamssl::causal_dwconv_ln (library loaded)."""

    @torch.library.register_fake("streamssl::causal_dwconv_ln")
    def _fake(x, weight, bias, ln_weight, ln_bias, cache, eps, swish):
        _check_args(x, weight, bias, ln_weight, ln_bias, cache, eps)
        B, T, C = x.shape
        K = weight.shape[1]
        acc = accumulation_dtype(x.dtype)
        return (
            x.new_empty((B, T, C)),
            x.new_empty((B, K - 1, C)),
            x.new_empty((B, T), dtype=acc),
            x.new_empty((B, T), dtype=acc),
        )

    @torch.library.register_fake("streamssl::causal_dwconv_ln_backward")
    def _fake_backward(grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd, swish):
        _check_args(x, weight, bias, ln_weight, ln_bias, cache)
        B, T, _ = x.shape
        check_tensor(grad_y, "grad_y", dtypes=(x.dtype,), device=x.device)
        if grad_y.shape != x.shape:
            raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
        for name, t in (("mean", mean), ("rstd", rstd)):
            check_tensor(t, name, dim=2, dtypes=(accumulation_dtype(x.dtype),), device=x.device)
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape (B, T) = ({B}, {T}), got {tuple(t.shape)}")
        bias_dtype = weight.dtype if bias is None else bias.dtype
        return (
            x.new_empty(x.shape),
            weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=bias_dtype),
            ln_weight.new_empty(ln_weight.shape),
            ln_bias.new_empty(ln_bias.shape),
        )

    def _setup_context(ctx, inputs, output):
        x, weight, bias, ln_weight, ln_bias, cache, _eps, swish = inputs
        _y, new_cache, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias, cache, mean, rstd)
        ctx.swish = swish
        ctx.mark_non_differentiable(new_cache, mean, rstd)

    def _backward(ctx, grad_y, _grad_cache, _grad_mean, _grad_rstd):
        x, weight, bias, ln_weight, ln_bias, cache, mean, rstd = ctx.saved_tensors
        gx, gw, gb, gg, gbeta = torch.ops.streamssl.causal_dwconv_ln_backward(
            grad_y.contiguous(), x, weight, bias, ln_weight, ln_bias, cache, mean, rstd, ctx.swish
        )
        need = ctx.needs_input_grad
        return (
            gx if need[0] else None,
            gw if need[1] else None,
            gb if (bias is not None and need[2]) else None,
            gg if need[3] else None,
            gbeta if need[4] else None,
            None,
            None,
            None,
        )

    torch.library.register_autograd("streamssl::causal_dwconv_ln", _backward, setup_context=_setup_context)
