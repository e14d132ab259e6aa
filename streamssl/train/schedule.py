"""Learning-rate schedule and per-step seeds shared by every training task."""

from __future__ import annotations

import math


def noam_lambda(warmup_steps: int, peak_lr: float, min_lr: float):
    """Multiplier of the peak learning rate at a step: linear warm-up, then 1/sqrt decay.

    lr(step) = peak * min(step / warmup, sqrt(warmup / step)), floored at min_lr; step counts
    from 1 (the first optimiser step does not use lr = 0).
    """
    floor = min_lr / peak_lr

    def f(step: int) -> float:
        s = step + 1
        if warmup_steps <= 0:
            return 1.0
        return max(floor, min(s / warmup_steps, math.sqrt(warmup_steps / s)))

    return f


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for (seed, step, rank): distinct streams, reproducible."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % 2**64
    h ^= h >> 31
    return h % 2**63
