"""Lhotse cut sets as training data (``data.train_cuts``), through the optional ``lhotse`` package.

A cut set (``cuts.jsonl.gz``, or any file ``CutSet.from_file`` reads) whose cuts are segments of
audio files becomes a :class:`ManifestIndex` (recording path, ``offset`` = cut start, ``duration``,
``text`` = the supervisions' texts), so it is batched, sharded over ranks and resumed exactly as a
JSON manifest is. Cuts that are not plain segments of one audio file (mixed or padded cuts, audio
held in memory or behind a URL, Lhotse Shar directories) are refused with the cut's id: write them
to files with Lhotse, or to tar shards with ``streamssl shard``.

Install with ``pip install 'streamssl[lhotse]'``.
"""

from __future__ import annotations

import json
import os
import tempfile

from .manifest import ManifestIndex, load_manifest

__all__ = ["load_cuts"]

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


def load_cuts(path: str | os.PathLike, *, min_duration: float | None = None, max_duration: float | None = None,
              keep_text: bool = False, key: str = KEY) -> ManifestIndex:
    """A :class:`ManifestIndex` of the cut set at ``path`` (module docstring).

    Raises ImportError without lhotse, ValueError naming ``key`` for a Shar directory, a missing
    file or a cut that is not a segment of one audio file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{key}: {path} is a directory (Lhotse Shar?); Shar is not read yet: give a cut set file "
                         f"(cuts.jsonl.gz) whose recordings are audio files")
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
