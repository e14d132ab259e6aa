"""Writing tarred shards in NeMo's layout (``streamssl shard``) and expanding shard patterns.

Layout written into ``OUT_DIR`` (what NeMo's ``convert_to_tarred_audio_dataset.py`` produces, so
NeMo reads it too, and what :mod:`streamssl.data.shard_loader` reads):

* ``audio_0.tar`` ... ``audio_{N-1}.tar``: one FLAC (or WAV) member per utterance, named after
  the source file (``-sub1``, ``-sub2``... appended on a name clash, as NeMo does);
* ``tarred_audio_manifest.json``: one JSON line per member with ``audio_filepath`` (the member
  name), ``duration`` (seconds actually written), ``shard_id`` and the source line's other keys
  (``text``, ``speaker``...), in the order the members were written into their shard.

Utterances are dealt out longest first to the shard with the fewest seconds so far, so the shards
hold the same audio time to within about one short utterance (duration-balanced: every rank and worker
that reads whole shards gets the same amount of audio). The number of shards is the PCM-16 size of
the corpus over ``target_mb`` (FLAC members come out smaller than the target). Tar headers carry
no time stamps or owners: the same input gives the same bytes.

The pattern to configure training with is ``OUT_DIR/audio__OP_0..{N-1}_CL_.tar`` (returned).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import soundfile as sf

from .audio import AudioReadError
from .manifest import load_manifest

__all__ = ["ShardSet", "write_shards", "index_webdataset", "expand_shard_pattern", "TARRED_MANIFEST"]

TARRED_MANIFEST = "tarred_audio_manifest.json"
_FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


@dataclass
class ShardSet:
    """What :func:`write_shards` wrote: the shard paths, their manifest and the pattern naming them."""

    shards: list[str]
    manifest: str
    pattern: str
    num_utterances: int
    seconds: list[float]  # audio seconds per shard
    skipped: list[tuple[str, str]]  # (source path, reason) of unreadable inputs


def _read_lines(manifest: str) -> list[dict]:
    with open(manifest, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plan_shards(index, target_mb: float, seed: int, num_shards: int | None) -> list[list[int]]:
    """Utterance indices per shard: duration-balanced, each shard in a seeded random order."""
    n = len(index)
    # Size estimate: 16-bit PCM at each file's rate (read from the header once per file).
    rates: dict[str, int] = {}
    nbytes = 0.0
    for i in range(n):
        p = index.path(i)
        if p not in rates:
            try:
                rates[p] = int(sf.info(p).samplerate)
            except Exception:  # noqa: BLE001 - reported below when the member is read
                rates[p] = 16000
        nbytes += float(index.durations[i]) * rates[p] * 2
    if num_shards is None:
        num_shards = max(1, math.ceil(nbytes / (target_mb * 2 ** 20)))
    num_shards = max(1, min(int(num_shards), n))

    # Longest first to the lightest shard (ties: lowest id), then each shard's members in a
    # seeded random order (a shard sorted by duration would defeat the reader's shuffle buffer).
    rank = np.random.default_rng(seed).permutation(n)  # rank[i]: utterance i's place in the shuffle
    load = np.zeros(num_shards)
    members: list[list[int]] = [[] for _ in range(num_shards)]
    for i in np.lexsort((rank, -index.durations)):
        s = int(np.argmin(load))
        members[s].append(int(i))
        load[s] += float(index.durations[i])
    return [sorted(rows, key=lambda i: rank[i]) for rows in members]


def write_shards(manifest: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 target_mb: float = 500.0, fmt: str = "flac", *, seed: int = 0,
                 num_shards: int | None = None) -> ShardSet:
    """Write the utterances of ``manifest`` as duration-balanced tar shards (module docstring).

    Args:
        manifest: a JSON-lines manifest (or a list of them), validated as for training.
        out_dir: created if needed; existing ``audio_*.tar`` there are replaced.
        target_mb: aimed-at shard size in MB of PCM-16 audio (FLAC members are smaller).
        fmt: ``"flac"`` (lossless, about half the size) or ``"wav"``; members are 16-bit PCM at
            the source's sample rate.
        seed: the shuffle that orders the members inside each shard.
        num_shards: force this many shards instead of deriving it from ``target_mb``.
    Unreadable inputs are left out and listed in ``skipped``.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    if not (target_mb > 0):
        raise ValueError(f"target_mb must be > 0, got {target_mb}")
    manifests = [os.fspath(manifest)] if isinstance(manifest, (str, os.PathLike)) else [os.fspath(m) for m in manifest]
    index = load_manifest(manifests, keep_text=False)
    lines = [line for m in manifests for line in _read_lines(m)]
    if len(lines) != len(index):  # load_manifest keeps every valid line when unfiltered
        raise ValueError(f"{', '.join(manifests)}: could not match manifest lines to the index")
    members = _plan_shards(index, target_mb, seed, num_shards)
    num_shards = len(members)

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):
        if re.fullmatch(r"audio_\d+\.tar", old):
            os.remove(os.path.join(out_dir, old))
    container, subtype = _FORMATS[fmt]
    used: dict[str, int] = {}
    out_lines: list[dict] = []
    shards, seconds, skipped = [], [], []
    for s, rows in enumerate(members):
        path = os.path.join(out_dir, f"audio_{s}.tar")
        tmp = path + ".tmp"
        secs = 0.0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in rows:
                src = index.path(i)
                try:
                    data, sr = _read_segment(src, float(index.offsets[i]), float(index.durations[i]))
                except AudioReadError as e:
                    skipped.append((e.path, e.reason))
                    continue
                stem = os.path.splitext(os.path.basename(src))[0]
                k = used.get(stem, 0)
                used[stem] = k + 1
                name = f"{stem}.{fmt}" if k == 0 else f"{stem}-sub{k}.{fmt}"
                buf = io.BytesIO()
                sf.write(buf, data, sr, format=container, subtype=subtype)
                payload = buf.getvalue()
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
                line = {k2: v for k2, v in lines[i].items() if k2 not in ("audio_filepath", "duration", "offset",
                                                                          "shard_id")}
                dur = data.shape[0] / sr
                out_lines.append({"audio_filepath": name, "duration": dur, "shard_id": s, **line})
                secs += dur
        os.replace(tmp, path)
        shards.append(path)
        seconds.append(secs)
    man = os.path.join(out_dir, TARRED_MANIFEST)
    with open(man + ".tmp", "w", encoding="utf-8") as f:
        for line in out_lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(man + ".tmp", man)
    pattern = os.path.join(out_dir, f"audio__OP_0..{num_shards - 1}_CL_.tar")
    return ShardSet(shards=shards, manifest=man, pattern=pattern, num_utterances=len(out_lines),
                    seconds=seconds, skipped=skipped)


def _read_segment(path: str, offset: float, duration: float) -> tuple[np.ndarray, int]:
    """The segment at the file's own rate and channels (no resampling: members keep the source)."""
    try:
        with sf.SoundFile(path) as f:
            sr = int(f.samplerate)
            f.seek(int(round(offset * sr)))
            data = f.read(max(1, int(round(duration * sr))), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types
        raise AudioReadError(path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    if data.shape[0] == 0:
        raise AudioReadError(path, "no samples in the requested segment")
    return (data[:, 0] if data.shape[1] == 1 else data), sr


# -- WebDataset-style shards --------------------------------------------------------------------------
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3", "sph", "aiff", "au")


def index_webdataset(pattern: str | Sequence[str], out_manifest: str | os.PathLike, *,
                     key: str = "data.train_tarred_audio_filepaths") -> tuple[int, list[tuple[str, str]]]:
    """Write the tarred manifest of existing WebDataset-style shards (members ``KEY.flac`` /
    ``KEY.wav`` ... with an optional ``KEY.json`` whose ``text`` is kept), so they train as NeMo
    shards do, without rewriting any audio.

    One sequential pass reads every shard (durations come from each member's audio header).
    Returns (utterances indexed, [(shard:member, reason) of unreadable members]).
    """
    shards = expand_shard_pattern(pattern, key=key)
    skipped: list[tuple[str, str]] = []
    n = 0
    out_manifest = os.fspath(out_manifest)
    with open(out_manifest + ".tmp", "w", encoding="utf-8") as f:
        for sid, path in enumerate(shards):
            entries: dict[str, dict] = {}
            order: list[str] = []
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    stem, _, ext = base.partition(".")
                    e = entries.get(stem)
                    if e is None:
                        e = entries[stem] = {}
                        order.append(stem)
                    if ext.lower() in AUDIO_EXTENSIONS and "audio" not in e:
                        data = tar.extractfile(m).read()
                        try:
                            info = sf.info(io.BytesIO(data))
                            e["audio"], e["duration"] = base, info.frames / info.samplerate
                        except Exception as err:  # noqa: BLE001 - soundfile raises several types
                            skipped.append((f"{path}:{base}", str(err).strip().splitlines()[0] if str(err).strip()
                                            else type(err).__name__))
                    elif ext.lower() == "json":
                        try:
                            meta = json.loads(tar.extractfile(m).read())
                        except ValueError:
                            meta = {}
                        if isinstance(meta, dict) and isinstance(meta.get("text"), str):
                            e["text"] = meta["text"]
            for stem in order:
                e = entries[stem]
                if "audio" not in e or not e["duration"] > 0:
                    continue
                line = {"audio_filepath": e["audio"], "duration": e["duration"], "shard_id": sid}
                if "text" in e:
                    line["text"] = e["text"]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                n += 1
    os.replace(out_manifest + ".tmp", out_manifest)
    return n, skipped


# -- patterns --------------------------------------------------------------------------------------
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _expand(s: str) -> list[str]:
    start = s.find("{")
    if start < 0:
        if "}" in s:
            raise ValueError(f"unbalanced '}}' in {s!r}")
        return [s]
    depth = 0
    for end in range(start, len(s)):
        if s[end] == "{":
            depth += 1
        elif s[end] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        raise ValueError(f"unbalanced '{{' in {s!r}")
    body, head, tail = s[start + 1:end], s[:start], s[end + 1:]
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        if lo > hi:
            raise ValueError(f"empty range {{{body}}} in {s!r} (the first bound is larger)")
        width = len(a) if (len(a) > 1 and a.startswith("0")) else 0
        choices = [str(v).zfill(width) for v in range(lo, hi + 1)]
    else:
        parts, depth, cur = [], 0, ""
        for ch in body:  # split on top-level commas
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            cur += ch
        parts.append(cur)
        if len(parts) < 2 and ".." in body:
            raise ValueError(f"bad range {{{body}}} in {s!r} (expected {{FIRST..LAST}} with integers)")
        choices = [x for p in parts for x in _expand(p)]
    return [head + c + t for c in choices for t in _expand(tail)]


def expand_shard_pattern(pattern: str | Sequence[str], *, key: str = "data.train_tarred_audio_filepaths",
                         check_files: bool = True) -> list[str]:
    """Shard paths named by a NeMo-style pattern (or a list of them), in order.

    ``_OP_`` and ``_CL_`` stand for ``{`` and ``}`` (NeMo's spelling, safe in shells and Hydra):
    ``audio__OP_0..511_CL_.tar`` = ``audio_{0..511}.tar`` = ``audio_0.tar`` ... ``audio_511.tar``.
    Ranges keep zero padding (``{000..511}``) and comma lists work (``{a,b}``). ValueError names
    ``key`` for a malformed pattern, a pattern that names no file, or (``check_files``) a
    missing shard.
    """
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    if not patterns:
        raise ValueError(f"{key}: no shard pattern given")
    out: list[str] = []
    for p in patterns:
        p = os.fspath(p)
        try:
            out.extend(_expand(p.replace("_OP_", "{").replace("_CL_", "}")))
        except ValueError as e:
            raise ValueError(f"{key}: bad shard pattern {p!r}: {e}") from None
    if check_files:
        missing = [p for p in out if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ValueError(f"{key}: {len(missing)} of {len(out)} shard(s) not found: "
                             f"{', '.join(missing[:3])}{more}")
    return out
