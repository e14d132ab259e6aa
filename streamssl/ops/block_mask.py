"""causal_block_mask: device-side causal block masking (docs/ARCHITECTURE.md, "The fused ops")."""

from __future__ import annotations

import torch

from . import reference
from ._args import _FLOATS, as_int64, check_tensor


def _check_args(feats, lengths, mask_embedding, mask_prob, block_size, min_start, max_mask_ratio, align):
    check_tensor(feats, "feats", dim=3, dtypes=_FLOATS)
    B, _, F = feats.shape
    check_tensor(lengths, "lengths", dim=1, dtypes=(torch.int64,), device=feats.device)
    if lengths.shape[0] != B:
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
    check_tensor(mask_embedding, "mask_embedding", dim=1, dtypes=(feats.dtype,), device=feats.device)
    if mask_embedding.shape[0] != F:
        raise ValueError(f"mask_embedding must have shape (F,) = ({F},), got {tuple(mask_embedding.shape)}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if not 0.0 <= max_mask_ratio <= 1.0:
        raise ValueError(f"max_mask_ratio must be in [0, 1], got {max_mask_ratio}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if min_start < 0:
        raise ValueError(f"min_start must be >= 0, got {min_start}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")


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
    """Mask causal blocks of frames and write ``mask_embedding`` into them, on feats' device.

    The mask is a pure function of (seed, offset, b, t, lengths): the same on CPU and CUDA, the
    same whatever the batch padding, and causal (a prefix's mask does not depend on later frames).
    Candidate starts are the frames s in [min_start, L) with s % align == 0 whose Philox uniform
    u(b, s) is below mask_prob; in increasing s, the block [s, min(s + block_size, L)) is kept iff
    afterwards the window [e - W, e) ending at its end e holds at most floor(max_mask_ratio * W)
    masked frames (W = min(left_context, e), or e when left_context <= 0). On CUDA nothing is
    read back to the host: no synchronisation, no ``.item()``.

    Args:
        feats: (B, T, F) float32 / bfloat16 / float16 / float64.
        lengths: (B,) int64 valid frames, on feats' device. Lengths above T count as T. Negative
            lengths raise a ValueError on the CPU; on CUDA they count as 0, because checking
            them would synchronise the stream.
        mask_embedding: (F,) same dtype and device as feats; gradients flow to it and to feats.
        seed, offset: Python ints; the RNG key is the seed, the counter starts with the offset.
        mask_prob: probability that a frame starts a block.
        block_size: frames per block (a block is clipped at the utterance's end).
        min_start: first frame that may start a block.
        left_context: window (feature frames) for the max_mask_ratio cap; <= 0 means the prefix.
        max_mask_ratio: most masked frames allowed in any window a block ends.
        align: block starts are multiples of this.
    Returns:
        masked: (B, T, F) new contiguous tensor in feats' dtype, ``where(mask, mask_embedding,
        feats)``. mask: (B, T) bool, True on masked frames (never at t >= L or t < min_start).
    Raises:
        ValueError naming the argument for a wrong shape, dtype or device, a probability outside
        [0, 1], block_size < 1, min_start < 0, align < 1 or (CPU) a negative length; TypeError
        for a non-int seed or offset. Nothing is computed then.
    """
    seed = as_int64(seed, "seed")
    offset = as_int64(offset, "offset")
    _check_args(feats, lengths, mask_embedding, mask_prob, block_size, min_start, max_mask_ratio, align)
    from . import uses_extension

    if not uses_extension(feats):
        # As in the kernels: refused on the CPU, clamped to 0 elsewhere (no host sync on CUDA).
        if feats.device.type == "cpu" and lengths.numel() and bool((lengths < 0).any()):
            raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
        return reference.causal_block_mask(
            feats, lengths, mask_embedding, seed, offset, mask_prob=mask_prob, block_size=block_size,
            min_start=min_start, left_context=left_context, max_mask_ratio=max_mask_ratio, align=align,
        )
    return torch.ops.streamssl.causal_block_mask(
        feats, lengths, mask_embedding, seed, offset, float(mask_prob), int(block_size),
        int(min_start), int(left_context), float(max_mask_ratio), int(align),
    )


def register_library_parts() -> None:
    """Fake kernel and autograd formula for streamssl::causal_block_mask (library loaded)."""

    @torch.library.register_fake("streamssl::causal_block_mask")
    def _fake(feats, lengths, mask_embedding, seed, offset, mask_prob, block_size, min_start,
              left_context, max_mask_ratio, align):
        masked = torch.empty_like(feats, memory_format=torch.contiguous_format)
        return masked, feats.new_empty(feats.shape[:2], dtype=torch.bool)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, grad_masked, _grad_mask):
        (mask,) = ctx.saved_tensors
        keep = mask.unsqueeze(-1)
        grad_feats = grad_masked.masked_fill(keep, 0) if ctx.needs_input_grad[0] else None
        grad_emb = None
        if ctx.needs_input_grad[2]:
            grad_emb = torch.where(keep, grad_masked, 0).sum(dim=(0, 1))
        return grad_feats, None, grad_emb, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "streamssl::causal_block_mask", _backward, setup_context=_setup_context
    )
