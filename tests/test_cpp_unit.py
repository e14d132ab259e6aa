"""Runs the C++ unit tests of csrc/common through CMake + ctest (the build a kernel author uses)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_ctest_common(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build),
        # The CUDA and libtorch targets are compiled by the JIT tests already; here only csrc/common.
        "-DSTREAMSSL_WITH_CUDA=OFF", "-DSTREAMSSL_WITH_TORCH=OFF",
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"], ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
