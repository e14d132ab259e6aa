"""Loader throughput from tar shards vs file by file, on the same corpus; reader memory vs buffer.

    pytest bench/bench_shards.py --benchmark-only        # pytest-benchmark tables
    python bench/bench_shards.py [--repeat 5] [--rounds 2]  # the "Tar shards" section of bench/RESULTS.md

The corpus is the demo corpus visited ``repeat`` times per epoch: the per-file loader gets the
manifest with weight ``repeat``, the shard loader ``repeat`` copies of it packed by
``write_shards`` (8 shards, FLAC or WAV members), so both deliver the same audio per epoch. Both
run with 0, 1 and 2 DataLoader workers and a 60 s batch budget; throughput is audio hours
delivered per second of wall time, best of ``rounds`` interleaved runs. The shard reader's memory is
the most member bytes it held at once (``peak_held_bytes``, one process) for several
``shuffle_buffer`` sizes, next to the size of the shards.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamssl.data import build_loader, load_manifest, make_demo_corpus  # noqa: E402
from streamssl.data.shard_loader import build_shard_loader, load_tarred_manifest  # noqa: E402
from streamssl.data.shards import write_shards  # noqa: E402

SR = 16000
BATCH_SECONDS = 60.0
NUM_SHARDS = 8


def make_corpora(root: str, repeat: int) -> dict:
    c = make_demo_corpus(os.path.join(root, "demo"), seed=0)
    out = {"files": load_manifest(c.train, weights=[repeat])}
    for fmt in ("flac", "wav"):
        t0 = time.perf_counter()
        s = write_shards([c.train] * repeat, os.path.join(root, fmt), fmt=fmt, num_shards=NUM_SHARDS)
        out[fmt] = (load_tarred_manifest(s.manifest, s.pattern), time.perf_counter() - t0,
                    sum(os.path.getsize(p) for p in s.shards))
    return out


def make_loader(corpora: dict, kind: str, workers: int, shuffle_buffer: int = 1000):
    if kind == "files":
        return build_loader(corpora["files"], None, batch_seconds=BATCH_SECONDS, seed=0, num_workers=workers)
    return build_shard_loader(corpora[kind][0], None, batch_seconds=BATCH_SECONDS, seed=0, num_workers=workers,
                              shuffle_buffer=shuffle_buffer)


def epoch(loader) -> float:
    """Iterate one epoch; seconds of audio delivered."""
    return sum(int(b["audio_lengths"].sum()) for b in loader) / SR


# -- pytest-benchmark -------------------------------------------------------------------------------
try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def corpora(tmp_path_factory):
        return make_corpora(str(tmp_path_factory.mktemp("bench_shards")), repeat=3)

    @pytest.mark.parametrize("workers", [1, 2])
    @pytest.mark.parametrize("kind", ["files", "flac", "wav"])
    def test_epoch(benchmark, corpora, kind, workers):
        loader = make_loader(corpora, kind, workers)
        seconds = benchmark.pedantic(epoch, args=(loader,), rounds=2, iterations=1)
        if benchmark.stats is not None:
            benchmark.extra_info["audio_hours_per_second"] = seconds / 3600 / benchmark.stats.stats.min


# -- script -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        corpora = make_corpora(root, args.repeat)
        hours = corpora["files"].total_seconds * args.repeat / 3600
        configs = [(k, w) for k in ("files", "flac", "wav") for w in (0, 1, 2)]
        best = {c: 0.0 for c in configs}
        for _ in range(args.rounds):
            for c in configs:
                loader = make_loader(corpora, *c)
                t0 = time.perf_counter()
                secs = epoch(loader)
                best[c] = max(best[c], secs / 3600 / (time.perf_counter() - t0))
        mem = {}
        for buf in (10, 100, 1000):
            loader = make_loader(corpora, "flac", 0, shuffle_buffer=buf)
            epoch(loader)
            mem[buf] = loader.dataset.peak_held_bytes
    print(f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread; "
          f"best of {args.rounds} interleaved epochs. Command: `python bench/bench_shards.py --repeat {args.repeat} "
          f"--rounds {args.rounds}`.\n")
    print(f"Epoch: demo corpus x{args.repeat} = {hours * 60:.0f} min of audio, {BATCH_SECONDS:.0f} s batch budget; "
          f"{NUM_SHARDS} shards (FLAC {corpora['flac'][2] / 2**20:.1f} MB written in {corpora['flac'][1]:.1f} s, "
          f"WAV {corpora['wav'][2] / 2**20:.1f} MB in {corpora['wav'][1]:.1f} s).\n")
    print("| loader | workers | audio h / s | vs per-file, same workers |")
    print("|---|---|---|---|")
    names = {"files": "per file (`build_loader`, WAV files)", "flac": "shards, FLAC members", "wav": "shards, WAV members"}
    for k, w in configs:
        print(f"| {names[k]} | {w} | {best[(k, w)]:.2f} | {best[(k, w)] / best[('files', w)]:.2f}x |")
    print(f"\nShard reader memory (most member bytes held at once, FLAC, one process; shards total "
          f"{corpora['flac'][2] / 2**20:.1f} MB):\n")
    print("| shuffle_buffer (utterances) | peak held MB |")
    print("|---|---|")
    for buf, b in mem.items():
        print(f"| {buf} | {b / 2**20:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
