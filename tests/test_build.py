"""The extension's build and backend selection (docs/ARCHITECTURE.md, "The fused ops")."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamssl.ops as ops
from streamssl.ops import _build

ROOT = Path(__file__).resolve().parent.parent


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for key in ("STREAMSSL_FORCE_REFERENCE", "STREAMSSL_NO_CUDA"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=900)


def test_backend_uses_compiled_kernels():
    """With a compiler the extension serves; with nvcc it includes the CUDA kernels (sm_80/sm_90):
    a compile or link error in any .cu file fails here rather than falling back quietly."""
    if _build.env_flag("STREAMSSL_FORCE_REFERENCE"):
        pytest.skip("STREAMSSL_FORCE_REFERENCE is set for this run")
    expected = "cuda+cpu" if _build.find_nvcc() else "cpu"
    assert ops.backend() == expected, _build.load()
    assert torch.ops.streamssl.built_with_cuda() == (expected == "cuda+cpu")


def test_cuda_objects_cover_every_cu_file():
    nvcc = _build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    root = _build.csrc_dir()
    objects = _build.compile_cuda_objects(root, _build.build_root(root) / "cuda" / "cuda_objects", nvcc)
    assert len(_build.cuda_sources(root)) >= 1
    assert len(objects) == len(_build.cuda_sources(root)) and all(o.stat().st_size > 0 for o in objects)
    # Each object carries a device binary (cubin) for every requested architecture. cuobjdump is
    # not part of every toolkit install, so read the embedded cubins' ELF headers directly:
    # e_machine 190 is EM_CUDA and the SM number sits in e_flags (bits 8-15 since CUDA 12's ELF
    # ABI, bits 0-7 before).
    for obj in objects:
        data = obj.read_bytes()
        sms, i = set(), data.find(b"\x7fELF", 1)
        while i >= 0:
            if struct.unpack_from("<H", data, i + 18)[0] == 190:
                flags = struct.unpack_from("<I", data, i + 48)[0]
                sms |= {(flags >> 8) & 0xFF, flags & 0xFF}
            i = data.find(b"\x7fELF", i + 4)
        for arch in _build.cuda_archs():
            assert int(arch) in sms, f"{obj.name} has no sm_{arch} cubin (found {sorted(sms)})"


_PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, streamssl.ops as ops
    name = ops.backend(); ops.backend()
    x = torch.randn(2, 50, 4); e = torch.zeros(4)
    masked, mask = ops.causal_block_mask(x, torch.tensor([50, 30]), e, 3, mask_prob=0.2, block_size=5, min_start=0)
    ref_masked, ref_mask = ops.reference.causal_block_mask(x, torch.tensor([50, 30]), e, 3, mask_prob=0.2, block_size=5, min_start=0)
    ok = bool(torch.equal(mask, ref_mask) and torch.equal(masked, ref_masked))
ours = [str(w.message) for w in caught if "streamssl" in str(w.message)]
print(json.dumps({"backend": name, "warnings": ours, "ok": ok}))
"""


def _probe(**env) -> dict:
    proc = _run_python(_PROBE, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_compiler_falls_back_to_reference_with_one_warning(tmp_path):
    out = _probe(CXX=str(tmp_path / "no-such-compiler"), STREAMSSL_NO_CUDA="1",
                 STREAMSSL_BUILD_DIR=str(tmp_path / "build"))
    assert out["backend"] == "reference"
    assert len(out["warnings"]) == 1 and "could not be built" in out["warnings"][0]
    assert out["ok"]


def test_force_reference_is_silent():
    out = _probe(STREAMSSL_FORCE_REFERENCE="1")
    assert out == {"backend": "reference", "warnings": [], "ok": True}


@pytest.mark.skipif(_build.find_nvcc() is None, reason="without nvcc the default build is already CPU-only")
def test_cpu_only_build(tmp_path):
    """STREAMSSL_NO_CUDA=1 builds the CPU variant even where nvcc exists."""
    out = _probe(STREAMSSL_NO_CUDA="1")
    assert out["backend"] == "cpu" and out["warnings"] == [] and out["ok"]


def test_cuda_tensors_on_a_build_without_cuda_warn_once_with_the_fix(monkeypatch):
    from types import SimpleNamespace

    import streamssl.ops as ops

    monkeypatch.setattr(ops, "backend", lambda: "cpu")
    monkeypatch.setattr(ops, "_warned_cuda_fallback", False)
    fake_cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    with pytest.warns(RuntimeWarning, match="STREAMSSL_BUILD_EXT=1"):
        assert ops.uses_extension(fake_cuda) is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.uses_extension(fake_cuda) is False  # once per process
