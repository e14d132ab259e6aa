"""Lhotse cut sets as training data (``data.train_cuts``), through the optional ``lhotse`` package.

A cut set (``cuts.jsonl.gz``, or any file ``CutSet.from_file`` reads) whose cuts are segments of
audio files becomes a :class:`ManifestIndex` (recording path, ``offset`` = cut start, ``duration``,
``text`` = the supervisions' texts), so it is batched, sharded over ranks and resumed exactly as a
JSON manifest is. Cuts that are not plain segments of one audio file (mixed or padded cuts, audio
held in memory or behind a URL) are refused with the cut's id: write them to files with Lhotse,
or to tar shards with ``streamssl shard``. Install with ``pip install 'streamssl[lhotse]'``.

A Lhotse Shar directory (``cuts.NNNNNN.jsonl.gz`` + ``recording.NNNNNN.tar``) is read as tar
shards by :func:`load_shar`, without lhotse: it streams and resumes exactly like NeMo shards.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
import tempfile

from .manifest import ManifestIndex, load_manifest

__all__ = ["load_cuts", "load_shar"]

KEY = "data.train_cuts"


def _import_lhotse(key: str):
    try:
        import lhotse
    except ImportError:
        raise ImportError(f"{key}: reading Lhotse cut sets needs the optional lhotse package "
                          f"(pip install 'streamssl[lhotse]')") from None
    return lhotse


def _line(cut, key: str) -> dict:
    rec = getattr(cut, "recording", None)
    if type(cut).__name__ != "MonoCut" or rec is None:
        raise ValueError(f"{key}: cut {cut.id!r} is a {type(cut).__name__} without a single recording; only "
                         f"segments of audio files are read (save mixed or padded cuts as audio first)")
    sources = rec.sources
    if len(sources) != 1 or sources[0].type != "file":
        kinds = ", ".join(s.type for s in sources)
        raise ValueError(f"{key}: cut {cut.id!r}: recording {rec.id!r} has source(s) of type {kinds}; only one "
                         f"audio file per recording is read")
    texts = [s.text for s in (cut.supervisions or []) if getattr(s, "text", None)]
    line = {"audio_filepath": os.path.abspath(sources[0].source), "offset": float(cut.start),
            "duration": float(cut.duration)}
    if texts:
        line["text"] = " ".join(texts)
    return line


def _shar_files(root: str, key: str) -> list[tuple[str, str]]:
    """[(cuts.NNNNNN.jsonl.gz, recording.NNNNNN.tar)] of a Lhotse Shar directory, in shard order."""
    cuts = sorted(f for f in os.listdir(root) if re.fullmatch(r"cuts\.\d+\.jsonl(\.gz)?", f))
    if not cuts:
        raise ValueError(f"{key}: {root} is a directory without cuts.NNNNNN.jsonl.gz files (not a Lhotse Shar "
                         f"directory)")
    out = []
    for c in cuts:
        num = c.split(".")[1]
        rec = os.path.join(root, f"recording.{num}.tar")
        if not os.path.isfile(rec):
            raise ValueError(f"{key}: {root} has {c} but no recording.{num}.tar (Shar written without audio?)")
        out.append((os.path.join(root, c), rec))
    return out


def load_shar(root: str | os.PathLike, *, min_duration: float | None = None, max_duration: float | None = None,
              key: str = KEY):
    """A Lhotse Shar directory as tar shards (a :class:`~streamssl.data.shard_loader.TarredIndex`):
    ``recording.NNNNNN.tar`` holds each cut's audio as ``CUT_ID.flac`` (or another format), its
    ``cuts.NNNNNN.jsonl.gz`` the durations and texts. Read without lhotse; streamed and resumed
    as NeMo shards are. Cuts whose audio is absent from the tar are left out (and counted in
    ``num_filtered``)."""
    from .shard_loader import load_tarred_manifest

    root = os.fspath(root)
    pairs = _shar_files(root, key)
    missing = 0
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "shar.json")
        with open(manifest, "w", encoding="utf-8") as f:
            for sid, (cuts, rec) in enumerate(pairs):
                with tarfile.open(rec, "r:") as tar:  # headers only: member names by cut id
                    names = {}
                    for m in tar:
                        base = os.path.basename(m.name)
                        stem, ext = os.path.splitext(base)
                        if m.isfile() and ext.lower() != ".json":
                            names.setdefault(stem, base)
                opener = gzip.open if cuts.endswith(".gz") else open
                with opener(cuts, "rt", encoding="utf-8") as cf:
                    for line in cf:
                        if not line.strip():
                            continue
                        cut = json.loads(line)
                        member = names.get(cut.get("id"))
                        if member is None:
                            missing += 1
                            continue
                        out = {"audio_filepath": member, "duration": float(cut["duration"]), "shard_id": sid}
                        texts = [s["text"] for s in cut.get("supervisions") or [] if s.get("text")]
                        if texts:
                            out["text"] = " ".join(texts)
                        f.write(json.dumps(out, ensure_ascii=False) + "\n")
        tindex = load_tarred_manifest(manifest, [rec for _, rec in pairs], min_duration=min_duration,
                                      max_duration=max_duration, key=key)
    tindex.index.manifests = [root]
    tindex.index.num_filtered += missing
    return tindex


def load_cuts(path: str | os.PathLike, *, min_duration: float | None = None, max_duration: float | None = None,
              keep_text: bool = False, key: str = KEY) -> ManifestIndex:
    """A :class:`ManifestIndex` of the cut set at ``path`` (module docstring).

    Raises ImportError without lhotse, ValueError naming ``key`` for a Shar directory, a missing
    file or a cut that is not a segment of one audio file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{key}: {path} is a directory: read Lhotse Shar directories with load_shar")
    if not os.path.isfile(path):
        raise ValueError(f"{key}: no such file: {path}")
    lhotse = _import_lhotse(key)
    cuts = lhotse.CutSet.from_file(path)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "cuts.json")
        with open(manifest, "w", encoding="utf-8") as f:
            for cut in cuts:
                f.write(json.dumps(_line(cut, key), ensure_ascii=False) + "\n")
        index = load_manifest(manifest, min_duration=min_duration, max_duration=max_duration, keep_text=keep_text)
    index.manifests = [path]
    return index
