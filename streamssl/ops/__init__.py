"""streamssl's fused ops: the Python face.

``backend()`` says which implementation serves: ``"cuda+cpu"`` (extension with CUDA kernels),
``"cpu"`` (extension without CUDA) or ``"reference"`` (pure PyTorch; a single warning says why
when this was not asked for with STREAMSSL_FORCE_REFERENCE=1). The extension is built on first use
(see ``streamssl.ops._build``); importing this package builds nothing.
"""

from __future__ import annotations

import threading
import warnings

from . import _build, reference
from .block_mask import causal_block_mask
from .dropout import philox_dropout
from .dwconv_ln import causal_dwconv_ln
from .subsampling_stem import subsampling_stem_backward

__all__ = [
    "backend", "causal_block_mask", "causal_dwconv_ln", "philox_dropout", "reference", "subsampling_stem_backward",
]

_lock = threading.Lock()
_registered = False


def backend() -> str:
    """Which implementation serves the ops: "cuda+cpu", "cpu" or "reference".

    The first call builds (or loads the cached) extension; later calls are free.
    """
    global _registered
    name, reason = _build.load()
    if _registered:
        return name
    with _lock:
        if not _registered:
            if reason is not None:
                what = "using the pure-PyTorch reference ops (slow)" if name == "reference" else "warning"
                warnings.warn(f"streamssl: {what}: {reason}", RuntimeWarning, stacklevel=2)
            if name != "reference":
                # Fake kernels and autograd formulas attach to ops the library defines.
                from . import block_mask, dropout, dwconv_ln, subsampling_stem

                block_mask.register_library_parts()
                dropout.register_library_parts()
                dwconv_ln.register_library_parts()
                subsampling_stem.register_library_parts()
            _registered = True
    return name


_warned_cuda_fallback = False


def _warn_cuda_fallback(name: str) -> None:
    """Once per process: CUDA tensors are being served by the slow path, and how to fix it."""
    global _warned_cuda_fallback
    if _warned_cuda_fallback:
        return
    _warned_cuda_fallback = True
    why = "no C++ extension could be built" if name == "reference" else "the extension was built without CUDA (no nvcc found)"
    warnings.warn(
        f"streamssl: CUDA tensors are running the pure-PyTorch reference ops because {why}: masking and the conv "
        "module are much slower this way. Install the CUDA toolkit matching your torch (nvcc on PATH or CUDA_HOME) "
        "and delete ~/.cache/streamssl/build, or build the wheel ahead of time with "
        "STREAMSSL_BUILD_EXT=1 pip install --no-build-isolation .", RuntimeWarning, stacklevel=3)


def device_backends() -> dict[str, str]:
    """The implementation serving each available device type, e.g. {"cpu": "cpu kernels", "cuda": ...}."""
    import torch

    name = backend()
    out = {"cpu": "reference ops (slow)" if name == "reference" else "cpu kernels"}
    if torch.cuda.is_available():
        out["cuda"] = "cuda kernels" if name == "cuda+cpu" else "reference ops (slow: no CUDA build)"
    return out


def uses_extension(*tensors) -> bool:
    """Whether the compiled kernels serve these tensors (their device has a kernel)."""
    name = backend()
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" and name != "cuda+cpu":
            _warn_cuda_fallback(name)
            return False
    if name == "reference":
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type not in ("cpu", "cuda", "meta"):
            return False
    return True
