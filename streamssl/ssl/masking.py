"""Block masking of the encoder input for masked-prediction pretraining (NEST / BEST-RQ style).

``BlockMasking`` wraps ``streamssl.ops.causal_block_mask``: it owns the mask embedding and a call
counter, so every training step gets fresh masks that are still a pure function of
(seed, rank, step) and come back exactly on resume. ``encoder_target_mask`` maps the input-rate
mask to the encoder frames whose prediction the loss scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from streamssl.ops import causal_block_mask

# Offset used in eval mode: the last value of the 32-bit counter word, far from the training
# counter (which reaches it only after 2^32 - 1 calls), so validation masks are fixed across
# evaluations and validating never changes the training masks.
EVAL_OFFSET = 2**32 - 1


def encoder_target_mask(
    mask: torch.Tensor,
    factor: int = 8,
    threshold: float = 0.8,
    lengths: torch.Tensor | None = None,
    num_frames: int | None = None,
) -> torch.Tensor:
    """Encoder-rate targets: frame j is a target iff >= threshold of frames [j*factor, (j+1)*factor) are masked.

    Runs on mask's device with tensor ops only (no host synchronisation).

    Args:
        mask: (B, T) bool input-rate mask (as returned by ``causal_block_mask``).
        factor: input frames per encoder frame (the subsampling factor).
        threshold: fraction of an encoder frame's input frames that must be masked, in [0, 1]:
            ``count >= threshold * factor`` in float64, i.e. at least ceil(0.8 * 8) = 7 of 8.
        lengths: optional (B,) int64 valid input frames; frames whose group is not complete
            (j >= lengths // factor, the quantizer's token lengths) are never targets.
        num_frames: encoder frames to return; default T // factor (one per complete group, like
            the quantizer's tokens). Extra frames past the groups are False.
    Returns:
        (B, num_frames) bool.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, T) bool tensor, got {getattr(mask, 'shape', type(mask))}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    B, T = mask.shape
    groups = T // factor
    if num_frames is None:
        num_frames = groups
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    # count >= threshold * factor  <=>  count >= ceil(threshold * factor) for an integer count.
    need = math.ceil(threshold * factor)
    counts = mask[:, : groups * factor].reshape(B, groups, factor).sum(dim=-1, dtype=torch.int32)
    target = counts >= need
    if lengths is not None:
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
        j = torch.arange(groups, device=mask.device)
        target &= j < torch.div(lengths.to(mask.device), factor, rounding_mode="floor").unsqueeze(1)
    if num_frames <= groups:
        return target[:, :num_frames]
    return torch.cat([target, target.new_zeros(B, num_frames - groups)], dim=1)


class BlockMasking(nn.Module):
    """Causal block masking with its mask embedding and its own reproducible RNG stream.

    Each training-mode call uses the next value of a call counter as the op's ``offset``, so masks
    change every step and are a pure function of (seed, rank, calls so far). The counter is saved
    in the state dict (``get_extra_state``), so a resumed run draws exactly the masks the
    uninterrupted one would have. Eval-mode calls use the fixed ``EVAL_OFFSET`` and leave the
    counter alone (validation masks repeat; validating does not shift the training masks).

    DDP: ranks must mask differently. The op's Philox key is the 64-bit seed; this module uses
    ``seed + rank * 2^32`` (mod 2^64), i.e. key word 0 = seed mod 2^32 and key word 1 =
    (seed >> 32) + rank: every rank has its own key, so its masks are independent of the other
    ranks' for every step (the counter word stays the step, identical on all ranks). ``rank``
    defaults to ``torch.distributed.get_rank()`` when a process group is initialised, else 0.

    Args:
        feat_dim: F, features per frame.
        mask_prob, block_size, min_start, left_context, max_mask_ratio, align: the rule's
            parameters (see ``streamssl.ops.causal_block_mask``); defaults give ~32 % masked.
        seed: int, the masking seed (also seeds the embedding's initialisation).
        learnable: the mask embedding is an ``nn.Parameter`` (trained) instead of a frozen buffer.
        init_std: the embedding is initialised N(0, init_std^2) (0.1: the scale of normalised
            log-mel features, but not a plausible frame).
        target_factor, target_threshold: defaults of ``target_mask`` (encoder subsampling 8,
            an encoder frame is a target when >= 80 % of its input frames are masked).
        rank: fixed DDP rank, or None to ask torch.distributed at each call.
    """

    def __init__(
        self,
        feat_dim: int,
        *,
        mask_prob: float = 0.01,
        block_size: int = 40,
        min_start: int = 16,
        left_context: int = -1,
        max_mask_ratio: float = 0.8,
        align: int = 1,
        seed: int = 0,
        learnable: bool = False,
        init_std: float = 0.1,
        target_factor: int = 8,
        target_threshold: float = 0.8,
        rank: int | None = None,
    ):
        super().__init__()
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        if not 0.0 <= max_mask_ratio <= 1.0:
            raise ValueError(f"max_mask_ratio must be in [0, 1], got {max_mask_ratio}")
        for name, value, low in (("block_size", block_size, 1), ("min_start", min_start, 0),
                                 ("align", align, 1), ("target_factor", target_factor, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0.0 <= target_threshold <= 1.0:
            raise ValueError(f"target_threshold must be in [0, 1], got {target_threshold}")
        if rank is not None and rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.feat_dim = feat_dim
        self.mask_prob, self.block_size, self.min_start = mask_prob, block_size, min_start
        self.left_context, self.max_mask_ratio, self.align = left_context, max_mask_ratio, align
        self.seed, self.rank = int(seed), rank
        self.target_factor, self.target_threshold = target_factor, target_threshold
        g = torch.Generator().manual_seed(int(seed) % 2**64)
        emb = torch.randn(feat_dim, generator=g) * init_std
        if learnable:
            self.mask_embedding = nn.Parameter(emb)
        else:
            self.register_buffer("mask_embedding", emb)
        self.calls = 0  # training-mode calls so far: the next offset

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, mask_prob={self.mask_prob}, block_size={self.block_size}, "
                f"min_start={self.min_start}, left_context={self.left_context}, "
                f"max_mask_ratio={self.max_mask_ratio}, align={self.align}, seed={self.seed}, "
                f"learnable={isinstance(self.mask_embedding, nn.Parameter)}")

    def current_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    def rank_seed(self) -> int:
        """The op's seed on this rank: (seed + rank * 2^32) mod 2^64."""
        return (self.seed + self.current_rank() * 2**32) % 2**64

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, offset: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask blocks of frames.

        Args:
            feats: (B, T, feat_dim) float32 / bfloat16 / float16 / float64.
            lengths: (B,) int64 valid frames, on feats' device.
            offset: explicit RNG offset (does not touch the counter); default: the counter in
                training mode (then advanced by one), ``EVAL_OFFSET`` in eval mode.
        Returns:
            masked: (B, T, feat_dim) in feats' dtype, the embedding (cast to feats' dtype; the
                gradient reaches a learnable embedding) on masked frames.
            mask: (B, T) bool.
        """
        if feats.dim() != 3 or feats.shape[-1] != self.feat_dim:
            raise ValueError(f"feats must be (B, T, {self.feat_dim}), got shape {tuple(feats.shape)}")
        if offset is None:
            if self.training:
                offset = self.calls
                self.calls += 1
            else:
                offset = EVAL_OFFSET
        emb = self.mask_embedding.to(device=feats.device, dtype=feats.dtype)
        return causal_block_mask(
            feats, lengths, emb, self.rank_seed(), offset, mask_prob=self.mask_prob,
            block_size=self.block_size, min_start=self.min_start, left_context=self.left_context,
            max_mask_ratio=self.max_mask_ratio, align=self.align,
        )

    def target_mask(
        self, mask: torch.Tensor, lengths: torch.Tensor | None = None, num_frames: int | None = None
    ) -> torch.Tensor:
        """Encoder-rate targets of a (B, T) mask: ``encoder_target_mask`` with this module's
        target_factor and target_threshold. Returns (B, num_frames or T // factor) bool."""
        return encoder_target_mask(mask, self.target_factor, self.target_threshold, lengths, num_frames)

    # The counter travels with the state dict: exact resume.
    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "calls" not in state:
            raise ValueError(f"BlockMasking: unexpected extra state {state!r}")
        self.calls = int(state["calls"])
