"""Build and load the streamssl C++/CUDA extension.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, cached in
``~/.cache/streamssl``; rebuilt only when a source or a flag changes). CUDA sources are compiled by
nvcc into plain object files first and linked in: the ``.cu`` launchers take raw pointers and a
``void*`` stream, so they need neither PyTorch's CUDA headers nor a CUDA build of PyTorch, and the
CUDA variant compiles and links on any machine with nvcc, GPU or not (docs/ARCHITECTURE.md, "The fused ops").

Environment:
    STREAMSSL_FORCE_REFERENCE=1  use the pure-PyTorch reference ops, build nothing.
    STREAMSSL_NO_CUDA=1          do not compile the CUDA sources even if nvcc is found.
    STREAMSSL_CUDA_ARCHS="80;90" compute capabilities to compile for (PTX of the last one is added).
    STREAMSSL_VERBOSE_BUILD=1    show the compiler command lines and output.
    STREAMSSL_BUILD_DIR=PATH     where builds are cached (default ~/.cache/streamssl/build).
    MAX_JOBS=N                   parallel compiler jobs (ninja and nvcc).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

EXTENSION_NAME = "streamssl_C"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class BuildError(RuntimeError):
    """A compiler or linker step failed; the message carries its output."""


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``streamssl/_csrc`` in an installed wheel, ``csrc/`` in a checkout."""
    for candidate in (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"streamssl's C++ sources were not found next to {_PACKAGE_DIR} "
        "(expected streamssl/_csrc/ops.cpp or csrc/ops.cpp)"
    )


def cpp_sources(root: Path) -> list[Path]:
    return [root / "ops.cpp"] + sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    return sorted((root / "cuda").glob("*.cu"))


def _tree_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_root(root: Path) -> Path:
    """Cache directory for this source tree, Python and torch (worktrees never share one)."""
    base = os.environ.get("STREAMSSL_BUILD_DIR")
    if base:
        base = Path(base)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        base = cache / "streamssl" / "build"
    tag = hashlib.sha256(f"{root}|{torch.__version__}|{sys.version}".encode()).hexdigest()[:12]
    return base / f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{tag}"


def find_nvcc() -> str | None:
    """Path of nvcc unless STREAMSSL_NO_CUDA is set; CUDA_HOME wins over PATH."""
    if env_flag("STREAMSSL_NO_CUDA"):
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> Path:
    """The CUDA toolkit root nvcc belongs to (nvcc may be a wrapper script elsewhere on PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent]
    proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("#$ TOP="):
            candidates.append(line.split("=", 1)[1].strip())
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "lib64" / "libcudart_static.a").is_file():
            return Path(c).resolve()
    raise BuildError(f"could not find the CUDA toolkit of {nvcc} (set CUDA_HOME)")


def cuda_archs() -> list[str]:
    raw = os.environ.get("STREAMSSL_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"STREAMSSL_CUDA_ARCHS={raw!r}: expected e.g. '80;90'")
    return archs


def nvcc_flags(root: Path, archs: list[str]) -> list[str]:
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", f"-I{root}"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest arch lets newer GPUs JIT the kernels.
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def compile_cuda_objects(root: Path, out_dir: Path, nvcc: str, verbose: bool = False) -> list[Path]:
    """Compile every ``csrc/cuda/*.cu`` to an object file; cached by content and flags.

    Returns the object paths. Raises BuildError with nvcc's output when a file does not compile.
    """
    sources = cuda_sources(root)
    headers = [p for d in ("common", "cuda") for p in (root / d).glob("*") if p.suffix in (".h", ".cuh")]
    flags = nvcc_flags(root, cuda_archs())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    shared = hashlib.sha256((" ".join(flags) + version + _tree_digest(headers)).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(src: Path) -> Path:
        key = hashlib.sha256((shared + _tree_digest([src])).encode()).hexdigest()[:16]
        obj = out_dir / f"{src.stem}-{key}.o"
        if obj.is_file():
            return obj
        tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
        cmd = [nvcc, *flags, "-c", str(src), "-o", str(tmp)]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"nvcc failed on {src}:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        if verbose and (proc.stdout or proc.stderr):
            print(proc.stdout + proc.stderr, file=sys.stderr)
        os.replace(tmp, obj)  # atomic: a concurrent build never sees half an object
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_jobs(), max(1, len(sources)))) as ex:
        return list(ex.map(one, sources))


def _cxx_flags() -> list[str]:
    # -fopenmp: at::parallel_for's OpenMP backend is inline code, parallel only when compiled so.
    return ["-O3", "-fopenmp", "-DNDEBUG"]


def build_extension(with_cuda: bool | None = None, verbose: bool | None = None) -> tuple[str, bool]:
    """Compile (if needed) and load the extension into ``torch.ops.streamssl``.

    Args:
        with_cuda: compile the CUDA sources too; None means "when nvcc is found".
        verbose: echo compiler commands; None reads STREAMSSL_VERBOSE_BUILD.
    Returns:
        (path of the loaded library, whether it contains the CUDA kernels).
    Raises:
        BuildError / OSError / RuntimeError when a step fails.
    """
    from torch.utils import cpp_extension

    verbose = env_flag("STREAMSSL_VERBOSE_BUILD") if verbose is None else verbose
    root = csrc_dir()
    nvcc = find_nvcc()
    if with_cuda is None:
        with_cuda = nvcc is not None
    if with_cuda and nvcc is None:
        raise BuildError("with_cuda=True but nvcc was not found (set CUDA_HOME or PATH)")
    out = build_root(root) / ("cuda" if with_cuda else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = _cxx_flags(), ["-fopenmp"]
    if with_cuda:
        objects = compile_cuda_objects(root, out / "cuda_objects", nvcc, verbose)
        cflags.append("-DSTREAMSSL_WITH_CUDA")
        # Static cudart: nothing to find at load time, and the library loads on CPU-only machines.
        lib = cuda_home(nvcc) / "lib64"
        ldflags += [str(o) for o in objects] + [f"-L{lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    name = EXTENSION_NAME + ("_cuda" if with_cuda else "")
    if not (out / f"{name}.so").is_file():
        print(
            f"streamssl: compiling the {'C++/CUDA' if with_cuda else 'C++'} extension "
            f"(first use; about a minute or two) into {out}",
            file=sys.stderr,
            flush=True,
        )
    started = time.time()
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in cpp_sources(root)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(root)],
        build_directory=str(out),
        is_python_module=False,
        verbose=verbose,
    )
    if verbose:
        print(f"streamssl: extension ready in {time.time() - started:.1f}s", file=sys.stderr)
    return str(out / f"{name}.so"), with_cuda


def prebuilt_library() -> Path | None:
    """A library built ahead of time by ``STREAMSSL_BUILD_EXT=1 pip install .``, if any."""
    for p in sorted(_PACKAGE_DIR.glob("_C*.so")):
        return p
    return None


_lock = threading.Lock()
_state: dict = {}


def load() -> tuple[str, str | None]:
    """Load the extension once per process; never raises.

    Returns:
        (backend, reason): backend is "cuda+cpu", "cpu" or "reference"; reason, when not None,
        says what went wrong (why the reference serves, or why the CUDA kernels are missing).
    """
    with _lock:
        if "backend" in _state:
            return _state["backend"], _state["reason"]
        backend, reason = _load_uncached()
        _state["backend"], _state["reason"] = backend, reason
        return backend, reason


def _load_uncached() -> tuple[str, str | None]:
    if env_flag("STREAMSSL_FORCE_REFERENCE"):
        return "reference", None
    pre = prebuilt_library()
    if pre is not None:
        try:
            torch.ops.load_library(str(pre))
            with_cuda = bool(torch.ops.streamssl.built_with_cuda())
            return ("cuda+cpu" if with_cuda else "cpu"), None
        except Exception as e:  # fall through to the JIT build
            print(f"streamssl: prebuilt {pre} did not load ({e}); building instead", file=sys.stderr)
    try:
        _, with_cuda = build_extension()
        return ("cuda+cpu" if with_cuda else "cpu"), None
    except Exception as first:
        if find_nvcc() is None:
            return "reference", f"the C++ extension could not be built: {_short(first)}"
        try:  # the CUDA part failed: the CPU kernels are still worth having
            build_extension(with_cuda=False)
            return "cpu", f"the CUDA kernels could not be built, CPU kernels only: {_short(first)}"
        except Exception as second:
            return "reference", f"the C++ extension could not be built: {_short(second)}"


def _short(e: Exception, limit: int = 2000) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ... (set STREAMSSL_VERBOSE_BUILD=1)"


