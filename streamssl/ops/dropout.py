"""philox_dropout: counter-based (Philox) dropout whose backward regenerates its mask.

Element n of x (row-major) is kept, scaled by 1 / (1 - p), iff its Philox word under the key
``seed`` is at least ceil(p * 2**32); otherwise it is multiplied by zero. The mask is a pure
function of (seed, n): nothing is stored for the backward, which applies the same op with the
same seed to the incoming gradient, and CPU threads, CUDA threads and the reference agree bit for
bit. The rule is written once in csrc/common/dropout_rule.h; ``reference.dropout`` is the same
rule in PyTorch, and serves where the extension does not (autograd through its multiply).

Op schema (csrc/ops.cpp)::

    philox_dropout(Tensor x, float p, int seed) -> Tensor
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._args import _FLOATS, as_int64, check_tensor


def _check_args(x, p) -> None:
    """ValueError/TypeError naming the argument; shared by the function and the fake kernel."""
    check_tensor(x, "x", dtypes=_FLOATS)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")


def philox_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Counter-based dropout of x (any shape; float32, float16, bfloat16 or float64).

    Args:
        x: the input; non-contiguous inputs are read in row-major order.
        p: drop probability in [0, 1).
        seed: 64-bit key of the mask (any Python int; taken mod 2**64).
    Returns:
        A new contiguous tensor of x's shape and dtype: x * 1/(1-p) where kept, x * 0 elsewhere,
        the product in float32 (float64 for float64). Differentiable in x.
    """
    from . import uses_extension

    _check_args(x, p)
    if not uses_extension(x):
        return reference.dropout(x, float(p), as_int64(seed, "seed"))
    return torch.ops.streamssl.philox_dropout(x, float(p), as_int64(seed, "seed"))


def register_library_parts() -> None:
    """The fake kernel and autograd formula of streamssl::philox_dropout (library loaded)."""

    @torch.library.register_fake("streamssl::philox_dropout")
    def _fake(x, p, seed):
        _check_args(x, p)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        _x, p, seed = inputs
        ctx.p, ctx.seed = p, seed

    def _backward(ctx, grad):
        # The mask regenerated from the seed: d(x * f)/dx = f.
        return torch.ops.streamssl.philox_dropout(grad, ctx.p, ctx.seed), None, None

    torch.library.register_autograd("streamssl::philox_dropout", _backward, setup_context=_setup_context)
