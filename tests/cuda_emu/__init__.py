"""CPU emulator for the project's CUDA kernels (see README.md): build + load helpers for tests."""

from .build import (
    SCHEDULES,
    CompilerNotFound,
    EmuError,
    EmuLibrary,
    build,
    cache_dir,
    compile_command,
    load,
)

__all__ = [
    "SCHEDULES",
    "CompilerNotFound",
    "EmuError",
    "EmuLibrary",
    "build",
    "cache_dir",
    "compile_command",
    "load",
]
