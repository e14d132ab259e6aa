"""Build and load the CUDA-emulator test libraries (plain g++, no PyTorch headers, ctypes).

``load(["emu_selftest.cpp"])`` compiles the given binding sources together with
``cuda_emu_runtime.cpp`` into one shared library, caches it under a content hash of every source,
header and flag, and returns an :class:`EmuLibrary`. Bindings are ``CUDA_EMU_BINDING`` functions
(see cuda_emu.h and README.md): ``extern "C"``, raw pointers and sizes in, a status code out; they
publish their parameter types, so :meth:`EmuLibrary.fn` converts and checks every call.

Environment:
  ``STREAMSSL_EMU_CACHE``  cache directory (default ``~/.cache/streamssl/emu``)
  ``CXX``                  the compiler (default ``g++``)
  ``CUDA_EMU_SCHEDULE``    read by the library at every launch (see README.md)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import operator
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

EMU_DIR = Path(__file__).resolve().parent
REPO_ROOT = EMU_DIR.parent.parent
CSRC_DIR = REPO_ROOT / "csrc"
RUNTIME_SOURCE = EMU_DIR / "cuda_emu_runtime.cpp"

# PyTorch's extension builds pass these to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS), so the
# real .cu build sees __half/__nv_bfloat16 without implicit conversions or operators. The emulator
# build defines them too: a kernel that only compiles with implicit conversions fails here as well.
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)

SCHEDULES = ("forward", "reverse", "random:0", "random:1", "parallel")
"""Schedules worth running a kernel under; the first four are deterministic."""

_HEADER_SUFFIXES = {".h", ".hpp", ".cuh", ".inc"}
_COUNTERS = ("launches", "blocks", "thread_runs", "block_barriers", "warp_ops", "token_passes")


class CompilerNotFound(RuntimeError):
    """No C++ compiler: the emulated tests cannot run on this machine."""


class EmuError(RuntimeError):
    """A binding or an emulated launch failed; ``code`` is the cuda_emu::Status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def cache_dir() -> Path:
    """Directory holding the built libraries (``$STREAMSSL_EMU_CACHE`` or ~/.cache/streamssl/emu)."""
    env = os.environ.get("STREAMSSL_EMU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamssl" / "emu"


def compiler() -> str:
    """Path of the C++ compiler (``$CXX`` or g++); raises CompilerNotFound if there is none."""
    name = os.environ.get("CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise CompilerNotFound(f"C++ compiler {name!r} not found (set CXX)")
    return path


@functools.lru_cache(maxsize=None)
def _compiler_identity(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path + "\n" + out.stdout


def _resolve(source: str | os.PathLike) -> Path:
    p = Path(source)
    if not p.is_absolute():
        p = EMU_DIR / p if (EMU_DIR / p).exists() else REPO_ROOT / p
    if not p.is_file():
        raise FileNotFoundError(f"emulator source {source!r} not found (looked in {EMU_DIR} and {REPO_ROOT})")
    return p.resolve()


def _headers(dirs: Iterable[Path]) -> list[Path]:
    found = set()
    for d in dirs:
        if d.is_dir():
            found.update(p.resolve() for p in d.rglob("*") if p.suffix in _HEADER_SUFFIXES and p.is_file())
    return sorted(found)


def compile_command(
    sources: Sequence[Path],
    output: Path,
    *,
    emu: bool = True,
    include_dirs: Sequence[str | os.PathLike] = (),
    extra_flags: Sequence[str] = (),
    opt: str = "-O1",
    shared: bool = True,
) -> list[str]:
    """The g++ command line that builds ``sources`` into ``output`` (a shared library, or an
    executable with shared=False).

    emu=True adds the emulator runtime, ``-DSTREAMSSL_CUDA_EMU``, the torch nvcc defines, and the
    include paths ``csrc/``, ``tests/cuda_emu/shim`` (stand-ins for cuda_fp16.h & co.) and
    ``tests/cuda_emu``. Symbols are hidden except the exported bindings, so two emulator libraries
    in one process never share the emulator's globals or a kernel's ``__shared__`` statics.
    """
    cmd = [compiler(), "-std=c++17", opt, "-pthread", "-Wall"]
    if shared:
        cmd += ["-fPIC", "-shared", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    srcs = [str(s) for s in sources]
    if emu:
        cmd += ["-DSTREAMSSL_CUDA_EMU=1", *TORCH_NVCC_DEFINES, f"-I{CSRC_DIR}", f"-I{EMU_DIR / 'shim'}", f"-I{EMU_DIR}"]
        srcs.append(str(RUNTIME_SOURCE))
    cmd += [f"-I{Path(d)}" for d in include_dirs]
    cmd += list(extra_flags)
    cmd += ["-o", str(output), *srcs, "-ldl"]
    return cmd


def build(
    sources: Sequence[str | os.PathLike],
    *,
    name: str | None = None,
    emu: bool = True,
    include_dirs: Sequence[str | os.PathLike] = (),
    extra_flags: Sequence[str] = (),
    opt: str = "-O1",
    shared: bool = True,
    verbose: bool = False,
) -> Path:
    """Compile ``sources`` into a shared library (or executable) and return its path, cached by a
    content hash of the sources, every header under csrc/ and tests/cuda_emu/, the flags and the
    compiler version.

    Args:
        sources: C++ files; relative paths are looked up in tests/cuda_emu/, then the repo root.
        name: stem of the library file (default: the first source's stem).
        emu: link the emulator runtime and use the emulator's flags (False for plain C++ helpers).
        include_dirs, extra_flags: added to the command line (and to the hash).
        opt: optimisation flag. -O1 builds about a third faster than -O2 and the emulated kernels
            spend much of their time in hand-offs between threads, not in arithmetic.
        shared: False builds an executable (e.g. a driver run under -fsanitize=thread).
    Raises:
        CompilerNotFound: no compiler. RuntimeError: the compiler failed (its output is included).
    """
    if not sources:
        raise ValueError("sources: need at least one C++ source")
    paths = [_resolve(s) for s in sources]
    name = name or paths[0].stem
    kw = dict(emu=emu, include_dirs=include_dirs, extra_flags=extra_flags, opt=opt, shared=shared)
    probe = compile_command(paths, Path("OUT"), **kw)
    h = hashlib.sha256()
    h.update(_compiler_identity(probe[0]).encode())
    h.update("\0".join(probe[1:]).encode())
    inc = [CSRC_DIR, EMU_DIR] if emu else []
    inc += [Path(d) for d in include_dirs]
    for p in [*paths, *([RUNTIME_SOURCE] if emu else []), *_headers(inc)]:
        h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".so" if shared else ".exe"
    target = out_dir / f"{name}-{h.hexdigest()[:20]}{suffix}"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=suffix + ".tmp", dir=out_dir)
    os.close(fd)
    try:
        cmd = compile_command(paths, Path(tmp), **kw)
        if verbose:
            print(shlex.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building {name} failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )
        os.replace(tmp, target)  # atomic: concurrent test processes never see half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_CTYPES = {
    "p": ctypes.c_void_p,
    "b": ctypes.c_bool,
    "i": ctypes.c_int32,
    "I": ctypes.c_uint32,
    "l": ctypes.c_int64,
    "L": ctypes.c_uint64,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}


def _pointer(arg, fn: str, index: int):
    """Address of a CPU tensor / numpy array / raw int (None is the null pointer)."""
    if arg is None:
        return None
    if isinstance(arg, bool):
        raise TypeError(f"{fn}: argument {index} must be a pointer, got bool")
    if isinstance(arg, int):
        return arg
    if hasattr(arg, "data_ptr"):  # torch.Tensor, without importing torch here
        if arg.device.type != "cpu":
            raise ValueError(f"{fn}: argument {index} must be a CPU tensor, got device {arg.device}")
        if not arg.is_contiguous():
            raise ValueError(f"{fn}: argument {index} must be contiguous (bindings take raw pointers)")
        return arg.data_ptr() or None
    if hasattr(arg, "__array_interface__"):  # numpy.ndarray
        if not arg.flags["C_CONTIGUOUS"]:
            raise ValueError(f"{fn}: argument {index} must be a C-contiguous array")
        return arg.__array_interface__["data"][0] or None
    raise TypeError(f"{fn}: argument {index} must be a tensor, array, int address or None, got {type(arg).__name__}")


class EmuLibrary:
    """A loaded emulator library: call bindings, choose the schedule, read counters."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.cuda_emu_last_error.restype = ctypes.c_char_p
        self.lib.cuda_emu_schedule.restype = ctypes.c_char_p
        self.lib.cuda_emu_schedule_override.restype = ctypes.c_char_p
        self.lib.cuda_emu_set_schedule.argtypes = [ctypes.c_char_p]
        self.lib.cuda_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
        self._fns: dict[str, tuple[ctypes._CFuncPtr, str]] = {}

    def _binding(self, name: str):
        if name not in self._fns:
            try:
                f = getattr(self.lib, name)
            except AttributeError:
                raise AttributeError(f"{self.path.name} has no binding {name!r}") from None
            try:
                sig_fn = getattr(self.lib, "cuda_emu_signature_" + name)
            except AttributeError:
                raise AttributeError(f"{name} is not declared with CUDA_EMU_BINDING (no signature)") from None
            sig_fn.restype = ctypes.c_char_p
            sig = sig_fn().decode()
            f.argtypes = [_CTYPES[c] for c in sig]
            f.restype = ctypes.c_int
            self._fns[name] = (f, sig)
        return self._fns[name]

    def signature(self, name: str) -> str:
        """Parameter codes of a binding: p pointer, i/I int32, l/L int64, f float, d double, b bool."""
        return self._binding(name)[1]

    def fn(self, name: str, *args) -> None:
        """Call binding ``name``; tensors/arrays become their data pointers. Raises EmuError on failure."""
        f, sig = self._binding(name)
        if len(args) != len(sig):
            raise TypeError(f"{name} takes {len(sig)} arguments ({sig}), got {len(args)}")
        conv = []
        for i, (code, a) in enumerate(zip(sig, args)):
            if code == "p":
                conv.append(_pointer(a, name, i))
            elif hasattr(a, "data_ptr") or hasattr(a, "__array_interface__"):
                raise TypeError(f"{name}: argument {i} is a scalar ({code}), got an array")
            elif code in "fd":
                conv.append(float(a))
            elif code == "b":
                conv.append(bool(a))
            else:
                try:
                    conv.append(operator.index(a))  # ints and numpy integers; floats are an error
                except TypeError:
                    raise TypeError(f"{name}: argument {i} must be an integer, got {type(a).__name__}") from None
        rc = f(*conv)
        if rc != 0:
            raise EmuError(f"{name}: {self.last_error()}", rc)

    def last_error(self) -> str:
        """Message of the last failure on this thread."""
        msg = self.lib.cuda_emu_last_error()
        return msg.decode() if msg else ""

    def get_schedule(self) -> str:
        """Schedule the next launch uses (override, else $CUDA_EMU_SCHEDULE, else random:0)."""
        s = self.lib.cuda_emu_schedule()
        if s is None:
            raise ValueError(self.last_error())
        return s.decode()

    def set_schedule(self, spec: str | None) -> None:
        """Override $CUDA_EMU_SCHEDULE: forward, reverse, random[:SEED], parallel; None clears."""
        rc = self.lib.cuda_emu_set_schedule(spec.encode() if spec else None)
        if rc != 0:
            raise ValueError(self.last_error())

    @contextlib.contextmanager
    def schedule(self, spec: str | None) -> Iterator[None]:
        """Run the body under schedule ``spec``, then restore whatever was overridden before."""
        prev = self.lib.cuda_emu_schedule_override()
        self.set_schedule(spec)
        try:
            yield
        finally:
            self.set_schedule(prev.decode() if prev else None)

    def counters(self) -> dict[str, int]:
        """Cumulative counts of launches, blocks, thread runs, barriers, warp ops and token passes."""
        buf = (ctypes.c_int64 * len(_COUNTERS))()
        self.lib.cuda_emu_counters(buf, len(_COUNTERS))
        return dict(zip(_COUNTERS, buf))


@functools.lru_cache(maxsize=None)
def _load_cached(sources: tuple[str, ...], extra_flags: tuple[str, ...], opt: str) -> EmuLibrary:
    return EmuLibrary(build(list(sources), extra_flags=extra_flags, opt=opt))


def load(sources: str | Sequence[str], *, extra_flags: Sequence[str] = (), opt: str = "-O1") -> EmuLibrary:
    """Build (or reuse) and load an emulator library from binding sources; one instance per process.

    Example: ``emu = load("emu_selftest.cpp"); emu.fn("emu_selftest_block_sum", x, out, n, 0)``.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return _load_cached(tuple(str(s) for s in sources), tuple(extra_flags), opt)
