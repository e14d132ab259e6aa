"""Keep freed host memory in the process, so a CPU training step does not re-fault its activations.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold
(dynamic, at most 32 MiB on 64-bit Linux) with a fresh ``mmap`` and unmaps it on ``free``, and it
trims the heap top above 128 KiB. The largest activations of a step (the subsampling's first
(B, 256, T/2, F/2) map and its gradient: 65 MB each for 8 x 4 s) are above any threshold glibc
will pick by itself, so every step maps, page-faults and zero-fills them again: about 45,000
minor faults (175 MB) per step of the seed-size NEST model, 8 % of its step time on one core
(bench/RESULTS.md). Raising both thresholds keeps the freed blocks in the heap for the next step,
the effect ``tcmalloc`` or ``jemalloc`` give through ``LD_PRELOAD``, without a dependency.

The cost is that the process keeps its peak heap (measured: +2 % resident memory for the seed
step, +1 % for the large one); ``trainer.keep_host_memory=false`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h); values are C ints.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks below 1 GiB come from the heap; up to 2 GiB - 1 of free heap top is kept.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_applied = False


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent).

    Returns:
        True when the settings are in effect (glibc, both accepted), False elsewhere (macOS,
        Windows, musl), where the platform's allocator is left alone.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
