"""JSON-lines manifests (NeMo format) loaded into a compact, fork-friendly index.

A manifest line looks like ``{"audio_filepath": "a/b.wav", "duration": 3.2, "offset": 0.0,
"text": "..."}``; ``audio_filepath`` is absolute or relative to the manifest's directory,
``offset`` and ``text`` are optional and unknown keys are ignored.

The index keeps one float64 per duration and offset, an int32 path id per utterance and the
paths in one UTF-8 byte buffer (consecutive repeats, e.g. segments of one recording, stored
once). No Python object exists per line, so a 100k-hour corpus
(tens of millions of lines) costs tens of bytes per utterance, and DataLoader workers forked from
the trainer share the arrays instead of slowly copying them page by page (the reference counts
of a list of Python strings are written on every access, which un-shares its pages).
"""

from __future__ import annotations

import array
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ManifestIndex", "ManifestError", "load_manifest"]

_MAX_REPORTED_ERRORS = 20


class ManifestError(ValueError):
    """A manifest is malformed; the message names every bad ``file:line`` (up to 20)."""


@dataclass
class ManifestIndex:
    """Compact index of one or more manifests.

    Attributes (N utterances, P distinct audio files, M manifests):
        durations:  (N,) float64, seconds to read.
        offsets:    (N,) float64, seconds into the file where the segment starts.
        path_ids:   (N,) int32, row of the path table (P rows).
        sources:    (N,) int16, which manifest (0..M-1) each utterance came from.
        weights:    (M,) float64, per-manifest repetition factor per epoch (see ``BucketBatchSampler``).
        manifests:  the M manifest paths, as given.
        path_bytes: (sum of path lengths,) uint8, the absolute paths, UTF-8, concatenated.
        path_starts: (P+1,) int64, path p is ``path_bytes[path_starts[p]:path_starts[p+1]]``.
        texts: None, or (text_bytes uint8, text_starts int64 (N+1,)) when loaded with keep_text.
        num_filtered: utterances dropped by the duration filters.
    """

    durations: np.ndarray
    offsets: np.ndarray
    path_ids: np.ndarray
    sources: np.ndarray
    weights: np.ndarray
    manifests: list[str]
    path_bytes: np.ndarray
    path_starts: np.ndarray
    texts: tuple[np.ndarray, np.ndarray] | None = None
    num_filtered: int = 0

    def __len__(self) -> int:
        return int(self.durations.shape[0])

    @property
    def num_files(self) -> int:
        return int(self.path_starts.shape[0] - 1)

    @property
    def total_seconds(self) -> float:
        return float(self.durations.sum())

    def path(self, i: int) -> str:
        """Absolute audio path of utterance ``i``."""
        p = int(self.path_ids[i])
        s, e = int(self.path_starts[p]), int(self.path_starts[p + 1])
        return self.path_bytes[s:e].tobytes().decode("utf-8")

    def text(self, i: int) -> str | None:
        """Transcript of utterance ``i`` (None unless loaded with ``keep_text=True`` and present)."""
        if self.texts is None:
            return None
        buf, starts = self.texts
        return buf[int(starts[i]):int(starts[i + 1])].tobytes().decode("utf-8")

    def subset(self, keep: np.ndarray) -> "ManifestIndex":
        """A new index with the utterances selected by ``keep`` (bool mask (N,) or int indices).

        The path table is shared (paths are only referenced, never copied per utterance).
        """
        keep = np.asarray(keep)
        if keep.dtype == bool:
            if keep.shape != self.durations.shape:
                raise ValueError(f"keep: bool mask of shape {keep.shape}, expected {self.durations.shape}")
            keep = np.flatnonzero(keep)
        texts = None
        if self.texts is not None:
            texts = _gather_strings(*self.texts, keep)
        return ManifestIndex(
            durations=self.durations[keep], offsets=self.offsets[keep], path_ids=self.path_ids[keep],
            sources=self.sources[keep], weights=self.weights.copy(), manifests=list(self.manifests),
            path_bytes=self.path_bytes, path_starts=self.path_starts, texts=texts,
            num_filtered=self.num_filtered)

    def save(self, path: str) -> None:
        """Save to ``.npz`` so later runs (and every DDP rank) skip JSON parsing."""
        arrays = dict(durations=self.durations, offsets=self.offsets, path_ids=self.path_ids,
                      sources=self.sources, weights=self.weights, path_bytes=self.path_bytes,
                      path_starts=self.path_starts, num_filtered=np.int64(self.num_filtered),
                      manifests=np.array(json.dumps(self.manifests)))
        if self.texts is not None:
            arrays["text_bytes"], arrays["text_starts"] = self.texts
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> "ManifestIndex":
        """Load an index written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            texts = (z["text_bytes"], z["text_starts"]) if "text_bytes" in z else None
            return cls(durations=z["durations"], offsets=z["offsets"], path_ids=z["path_ids"],
                       sources=z["sources"], weights=z["weights"],
                       manifests=json.loads(str(z["manifests"])), path_bytes=z["path_bytes"],
                       path_starts=z["path_starts"], texts=texts,
                       num_filtered=int(z["num_filtered"]))


def _gather_strings(buf: np.ndarray, starts: np.ndarray, keep: np.ndarray):
    lens = (starts[1:] - starts[:-1])[keep]
    new_starts = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_starts[1:])
    if len(keep) == 0:
        return np.zeros(0, np.uint8), new_starts
    # Vectorised ragged gather: source position of every output byte.
    src = np.repeat(starts[:-1][keep] - new_starts[:-1], lens) + np.arange(new_starts[-1])
    return buf[src], new_starts


class _PathTable:
    """Distinct paths packed in one bytearray while parsing.

    Consecutive repeats (segments of one recording, the usual manifest layout) share one entry;
    a full dedup would need a set of every path as a Python string, which for tens of millions of
    files costs gigabytes at load time. A repeat that is not consecutive only costs its bytes.
    """

    def __init__(self):
        self.buf = bytearray()
        self.starts = array.array("q", [0])
        self.last: str | None = None

    def add(self, path: str) -> int:
        if path != self.last:
            self.buf += path.encode("utf-8")
            self.starts.append(len(self.buf))
            self.last = path
        return len(self.starts) - 2


def _parse_one(manifest: str, check_files: bool, keep_text: bool, table: _PathTable, require_text: bool = False):
    """Parse one manifest into compact arrays, adding its paths to ``table``."""
    base = os.path.dirname(os.path.abspath(manifest)) + os.sep
    durations = array.array("d")
    offsets = array.array("d")
    path_ids = array.array("q")
    texts: list[str] = []
    errors: list[str] = []
    last_checked: tuple[str, bool] = ("", False)
    loads, isfinite, number = json.loads, math.isfinite, (int, float)
    try:
        f = open(manifest, "r", encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{manifest}: cannot open manifest: {e.strerror or e}") from None
    # The loop body is what 100k-hour corpora pay tens of millions of times: plain checks
    # first, messages only on the error path.
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line or line.isspace():
                continue
            try:
                item = loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{manifest}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if type(item) is not dict:
                errors.append(f"{manifest}:{lineno}: expected a JSON object, got {type(item).__name__}")
                continue
            audio = item.get("audio_filepath")
            dur = item.get("duration")
            off = item.get("offset") or 0.0
            if audio is None or dur is None:
                missing = [k for k in ("audio_filepath", "duration") if k not in item]
                if missing:
                    errors.append(f"{manifest}:{lineno}: missing key(s) {', '.join(repr(k) for k in missing)}")
                    continue
            if type(audio) is not str or not audio:
                errors.append(f"{manifest}:{lineno}: 'audio_filepath' must be a non-empty string, got {audio!r}")
                continue
            if type(dur) not in number or not isfinite(dur) or dur <= 0:
                errors.append(f"{manifest}:{lineno}: 'duration' must be a positive finite number, got {dur!r}")
                continue
            if type(off) not in number or not isfinite(off) or off < 0:
                errors.append(f"{manifest}:{lineno}: 'offset' must be a non-negative finite number, got {off!r}")
                continue
            if audio[0] == os.sep:
                path = audio
            else:
                path = base + audio
                if "./" in path or "//" in path:
                    path = os.path.normpath(path)
            if check_files:
                if last_checked[0] != path:
                    last_checked = (path, os.path.isfile(path))
                if not last_checked[1]:
                    errors.append(f"{manifest}:{lineno}: audio file not found: {path}")
                    continue
            if require_text:
                t = item.get("text")
                if not isinstance(t, str) or not t.strip():
                    errors.append(f"{manifest}:{lineno}: " + ("missing key 'text' (a transcript is needed here)"
                                  if t is None else f"'text' must be a non-empty transcript, got {t!r}"))
                    continue
            if errors:
                continue  # the load will fail: only keep looking for more errors
            durations.append(dur)
            offsets.append(off)
            path_ids.append(table.add(path))
            if keep_text:
                t = item.get("text", "")
                texts.append(t if isinstance(t, str) else str(t))
    return durations, offsets, path_ids, texts, errors


def load_manifest(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
                  weights: float | Sequence[float] | None = None,
                  min_duration: float | None = None,
                  max_duration: float | None = None,
                  *, check_files: bool = True, keep_text: bool = False, require_text: bool = False) -> ManifestIndex:
    """Load and validate one or several JSON-lines manifests into a :class:`ManifestIndex`.

    Args:
        path_or_paths: a manifest path, or a list of them (their utterances are concatenated).
        weights: one repetition factor per manifest (default 1.0 each): how many times per epoch
            the sampler visits that manifest's utterances (2.0 = twice, 0.5 = a random half).
        min_duration, max_duration: keep utterances with ``min <= duration <= max`` seconds;
            the number dropped is ``index.num_filtered``.
        check_files: verify every referenced audio file exists (one ``stat`` per distinct file;
            for millions of files on a network filesystem, pass False and cache the index with
            :meth:`ManifestIndex.save`).
        keep_text: also keep ``text`` (not needed for self-supervised training).
        require_text: every line must have a non-empty ``text`` (implies ``keep_text``).

    Raises:
        ManifestError (a ValueError) naming ``file:line`` of every malformed line (the first 20
        are listed): invalid JSON, missing ``audio_filepath``/``duration``, non-positive or
        non-finite duration, negative offset, missing audio file. Also raised when nothing is
        left after filtering.
    """
    manifests, w = _manifests_and_weights(path_or_paths, weights)
    if min_duration is not None and max_duration is not None and min_duration > max_duration:
        raise ValueError(f"min_duration ({min_duration}) > max_duration ({max_duration})")
    index = _parse_all(manifests, w, check_files, keep_text or require_text, require_text)
    keep = np.ones(len(index), dtype=bool)
    if min_duration is not None:
        keep &= index.durations >= min_duration
    if max_duration is not None:
        keep &= index.durations <= max_duration
    n_drop = int((~keep).sum())
    if n_drop:
        index = index.subset(keep)
        index.num_filtered = n_drop
    if len(index) == 0:
        raise ManifestError(
            f"no utterances in {', '.join(manifests)}"
            + (f" after the duration filter [{min_duration}, {max_duration}] s dropped {n_drop}" if n_drop else ""))
    return index


def _manifests_and_weights(path_or_paths, weights) -> tuple[list[str], np.ndarray]:
    """The manifest paths as a list and one float64 repetition weight each, checked."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        manifests = [os.fspath(path_or_paths)]
    else:
        manifests = [os.fspath(p) for p in path_or_paths]
    if not manifests:
        raise ValueError("path_or_paths: no manifest given")
    if len(manifests) > np.iinfo(np.int16).max:
        raise ValueError(f"path_or_paths: at most {np.iinfo(np.int16).max} manifests")
    if weights is None:
        return manifests, np.ones(len(manifests), dtype=np.float64)
    w = np.atleast_1d(np.asarray(weights, dtype=np.float64))
    if w.shape != (len(manifests),):
        raise ValueError(f"weights: expected {len(manifests)} value(s), one per manifest, got {w.tolist()}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights: must be finite and non-negative, got {w.tolist()}")
    return manifests, w


def _parse_all(manifests: list[str], w: np.ndarray, check_files: bool, keep_text: bool,
               require_text: bool) -> ManifestIndex:
    """Every manifest's lines into one unfiltered index; all bad lines reported together."""
    table = _PathTable()
    all_dur, all_off, all_ids, all_src, all_text = [], [], [], [], []
    errors: list[str] = []
    for m, manifest in enumerate(manifests):
        dur, off, ids, texts, errs = _parse_one(manifest, check_files, keep_text, table, require_text)
        errors.extend(errs)
        all_dur.append(np.frombuffer(dur, dtype=np.float64))
        all_off.append(np.frombuffer(off, dtype=np.float64))
        all_ids.append(np.frombuffer(ids, dtype=np.int64))
        all_src.append(np.full(len(dur), m, dtype=np.int16))
        all_text.extend(texts)
    if errors:
        shown = "\n  ".join(errors[:_MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - _MAX_REPORTED_ERRORS} more" if len(errors) > _MAX_REPORTED_ERRORS else ""
        raise ManifestError(f"{len(errors)} bad manifest line(s):\n  {shown}{more}")
    n_paths = len(table.starts) - 1
    if n_paths > np.iinfo(np.int32).max:
        raise ValueError("more than 2**31-1 distinct audio files")

    durations = np.concatenate(all_dur)
    offsets = np.concatenate(all_off)
    sources = np.concatenate(all_src)
    path_ids = np.concatenate(all_ids).astype(np.int32)
    path_bytes = np.frombuffer(bytes(table.buf), dtype=np.uint8)
    path_starts = np.frombuffer(table.starts, dtype=np.int64).copy()
    del table, all_dur, all_off, all_ids

    texts = None
    if keep_text:
        enc = [t.encode("utf-8") for t in all_text]
        starts = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in enc], out=starts[1:])
        texts = (np.frombuffer(b"".join(enc), dtype=np.uint8), starts)

    return ManifestIndex(durations=durations, offsets=offsets, path_ids=path_ids, sources=sources,
                         weights=w, manifests=manifests, path_bytes=path_bytes,
                         path_starts=path_starts, texts=texts)
