"""keep_freed_host_memory: a freed large block is reused without page faults (glibc only)."""

import json
import platform
import subprocess
import sys

import pytest

_PROBE = r"""
import json, resource, sys, torch
from streamssl.train.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False

def faults_of_a_64mb_map():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, every page written
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

first = faults_of_a_64mb_map()
again = [faults_of_a_64mb_map() for _ in range(7)]
print(json.dumps({"applied": applied, "first": first, "again": again}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_freed_activation_sized_block_is_reused_without_faults():
    kept, default = _faults("keep"), _faults("default")
    assert kept["applied"]
    # The first touch of 64 MiB faults on any kernel (>= 32 faults even with 2 MiB huge pages).
    assert kept["first"] >= 32 and default["first"] >= 32
    # With glibc's defaults every allocation is a fresh mapping; kept, the heap block is reused
    # (now and then the heap still grows past a small block left where the big one was: that
    # allocation faults again, the rest of the time none do).
    assert min(default["again"]) > default["first"] / 2
    assert sorted(kept["again"])[len(kept["again"]) // 2] < kept["first"] / 10


def test_keep_freed_host_memory_is_idempotent():
    from streamssl.train.host_memory import keep_freed_host_memory

    assert keep_freed_host_memory() == keep_freed_host_memory()
