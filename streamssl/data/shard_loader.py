"""Streaming batches from tar shards (NeMo's tarred layout), resumable exactly.

Each rank reads a disjoint set of whole shards, and each of its DataLoader workers a disjoint part of
those, front to back: one open file and sequential reads per worker, whatever the corpus size.

Everything that decides *which* utterances form *which* batch is planned from the tarred manifest
(durations and ``shard_id``), before any audio is read, as a pure function of (manifest, shard
count, seed, epoch, world size, workers, settings):

1. Shards are shuffled per (seed, epoch) and dealt, in that order, to the rank with the fewest
   seconds so far; each rank deals its shards to its workers the same way (:func:`assign_shards`).
   Ranks never share a shard.
2. A worker's stream is its shards' members in manifest order (the order NeMo and
   ``streamssl shard`` write them). It is shuffled inside consecutive blocks of ``shuffle_buffer``
   utterances: the reader never holds more than a block of undelivered members (plus the partial
   batches below), so memory is bounded by the buffer, not the shard or the corpus.
3. Batches are cut per duration bucket as in :class:`BucketBatchSampler` (same bucket edges and
   padded-seconds budget): an utterance joins its bucket's open batch, which is closed when full,
   or at the end of a window of ``WINDOW_BLOCKS`` shuffle blocks (so no batch waits on a rare
   bucket for the rest of the stream: a reader holds at most a block plus the open batches of
   one window, and a resumed worker re-reads at most a window's tar headers).
4. Ranks get equal batch counts (DDP never waits on a rank that ran out): the ranks with fewer
   batches split their largest ones (no utterance repeated) until they have as many as the
   others. A rank's batches alternate between its workers (round robin).

Because the plan is known, a checkpoint only needs (epoch, batches consumed): on resume each worker
works out which shard and member offset its next undelivered batch starts reading at, opens that
shard and skips to there (tar headers only). ``state_dict()`` reports that position per worker
(``streams``: shard order, shard index, member offset), and ``load_state_dict`` checks it against
the plan, so a changed manifest or shard set is refused instead of resuming somewhere else.

A member that is missing, unreadable or corrupt is left out of its batch, listed in
``batch["skipped"]`` and counted (``num_skipped``); ``strict=True`` raises instead. Batches are the
same dicts as :mod:`streamssl.data.loader`'s (``indices`` are rows of the tarred manifest).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .audio import AudioReadError, load_audio
from .loader import _NOISE_SALT, AudioBatchDataset, _identity
from .manifest import ManifestError, ManifestIndex, load_manifest
from .sampler import BucketBatchSampler, check_resume_settings
from .shards import expand_shard_pattern

__all__ = ["TarredIndex", "load_tarred_manifest", "assign_shards", "ShardStreamDataset", "ShardLoader",
           "build_shard_loader"]

log = logging.getLogger("streamssl.data")

KEY = "data.train_tarred_audio_filepaths"
# Open batches close at the latest every WINDOW_BLOCKS shuffle blocks: this bounds what a reader holds
# and how far back a resumed worker re-reads, for about num_buckets extra partial batches per window.
WINDOW_BLOCKS = 16
_SHARD_SALT = 0x7368617264  # separates the shard shuffle from the sampler's (seed, epoch) stream
_BLOCK_SALT = 0x626C6F636B


@dataclass
class TarredIndex:
    """A tarred manifest: the :class:`ManifestIndex` of its lines, each line's shard, the shard paths."""

    index: ManifestIndex
    shard_ids: np.ndarray  # (N,) int32
    shards: list[str]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shard_seconds(self) -> np.ndarray:
        return np.bincount(self.shard_ids, weights=self.index.durations, minlength=len(self.shards))

    def member(self, i: int) -> str:
        """The tar member name of row ``i`` (the basename of its ``audio_filepath``, as NeMo matches it)."""
        return os.path.basename(self.index.path(i))

    def seeded_shards(self, seconds: float, seed: int = 0) -> "TarredIndex":
        """The rows of whole shards, taken in a seeded order until ``seconds`` of audio are covered
        (a sample for statistics that reads a few shards front to back, not members everywhere)."""
        sec = self.shard_seconds
        order = np.random.default_rng(seed).permutation(len(self.shards))
        n = int(np.searchsorted(np.cumsum(sec[order]), seconds)) + 1
        return self.subset(np.isin(self.shard_ids, order[:n]))

    def subset(self, keep: np.ndarray) -> "TarredIndex":
        keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep)
        return TarredIndex(self.index.subset(keep), self.shard_ids[keep], self.shards)


def load_tarred_manifest(manifest: str | Sequence[str], pattern: str | Sequence[str], *,
                         min_duration: float | None = None, max_duration: float | None = None,
                         key: str = KEY) -> TarredIndex:
    """Load a tarred manifest (lines with ``audio_filepath`` = member name, ``duration``, ``shard_id``)
    and the shards named by ``pattern`` (see :func:`expand_shard_pattern`).

    Raises ValueError naming ``key`` for a bad pattern, missing shards, or a ``shard_id`` that the
    pattern does not cover, and :class:`ManifestError` naming ``file:line`` for bad lines.
    """
    shards = expand_shard_pattern(pattern, key=key)
    manifests = [os.fspath(manifest)] if isinstance(manifest, (str, os.PathLike)) else [os.fspath(m) for m in manifest]
    index = load_manifest(manifests, check_files=False)
    ids, errors = [], []
    for m in manifests:
        with open(m, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line or line.isspace():
                    continue
                sid = json.loads(line).get("shard_id")
                if type(sid) is not int or sid < 0:
                    errors.append(f"{m}:{lineno}: 'shard_id' must be a non-negative integer, got {sid!r} "
                                  f"(a tarred manifest names each utterance's shard)")
                    continue
                if sid >= len(shards):
                    errors.append(f"{m}:{lineno}: shard_id {sid} but {key} names {len(shards)} shard(s)")
                    continue
                ids.append(sid)
    if errors:
        raise ManifestError(f"{len(errors)} bad tarred manifest line(s):\n  " + "\n  ".join(errors[:20]))
    tindex = TarredIndex(index, np.asarray(ids, dtype=np.int32), shards)
    keep = np.ones(len(index), dtype=bool)
    if min_duration is not None:
        keep &= index.durations >= min_duration
    if max_duration is not None:
        keep &= index.durations <= max_duration
    if not keep.all():
        n_drop = int((~keep).sum())
        tindex = tindex.subset(keep)
        tindex.index.num_filtered = n_drop
    if len(tindex) == 0:
        raise ManifestError(f"no utterances in {', '.join(manifests)} within [{min_duration}, {max_duration}] s")
    return tindex


def assign_shards(shard_seconds: Sequence[float], world_size: int, num_workers: int = 1, *, seed: int = 0,
                  epoch: int = 0, shuffle: bool = True) -> list[list[list[int]]]:
    """``out[rank][worker]``: the shards that worker of that rank reads in ``epoch``, in order.

    Shards are shuffled per (seed, epoch) and dealt to the rank with the fewest seconds so far
    (ties: lowest rank), then within a rank to its workers the same way. Every shard goes to
    exactly one (rank, worker). ValueError when there are fewer shards than ranks.
    """
    sec = np.asarray(shard_seconds, dtype=np.float64)
    n, workers = sec.shape[0], max(1, int(num_workers))
    if n < world_size:
        raise ValueError(f"{KEY}: {n} shard(s) cannot be split over {world_size} ranks (each rank reads whole "
                         f"shards): write at least {world_size} shards (streamssl shard --num-shards)")
    order = np.random.default_rng([seed, epoch, _SHARD_SALT]).permutation(n) if shuffle else np.arange(n)

    def deal(items, k):
        load, out = np.zeros(k), [[] for _ in range(k)]
        for s in items:
            j = int(np.argmin(load))
            out[j].append(int(s))
            load[j] += sec[s]
        return out

    return [deal(mine, workers) for mine in deal(order, world_size)]


class _Stream:
    """One (rank, worker)'s plan for an epoch: its shards, stream and batches."""

    def __init__(self, shards: list[int], rows: np.ndarray, shard_start: np.ndarray, batches: list[np.ndarray]):
        self.shards = shards  # shard ids, read in this order
        self.rows = rows  # (L,) manifest rows in read order
        self.shard_start = shard_start  # (len(shards)+1,) stream position where each shard starts
        self.batches = batches  # each: stream positions (into rows)

    def resume_point(self, first_batch: int) -> tuple[int, int]:
        """(shard index into ``self.shards``, member offset) where batch ``first_batch`` onwards starts reading."""
        if first_batch >= len(self.batches):
            return len(self.shards), 0
        p = min(int(b.min()) for b in self.batches[first_batch:])
        i = int(np.searchsorted(self.shard_start, p, side="right") - 1)
        return i, p - int(self.shard_start[i])


class _RankPlan:
    def __init__(self, streams: list[_Stream]):
        self.streams = streams
        counts = np.array([len(s.batches) for s in streams])
        # Round robin over the workers that still have batches: entry k = (worker, local batch).
        w = np.concatenate([np.full(c, i) for i, c in enumerate(counts)]) if counts.sum() else np.zeros(0, int)
        j = np.concatenate([np.arange(c) for c in counts]) if counts.sum() else np.zeros(0, int)
        o = np.lexsort((w, j))
        self.worker, self.local = w[o].astype(np.int64), j[o].astype(np.int64)

    def __len__(self) -> int:
        return int(self.worker.shape[0])

    def first_local(self, worker: int, position: int) -> int:
        """How many of ``worker``'s batches lie before rank position ``position``."""
        return int((self.worker[:position] == worker).sum())


class ShardStreamDataset(IterableDataset):
    """Iterable over one rank's batches of an epoch, from ``position`` on (set by :class:`ShardLoader`).

    In a DataLoader worker ``w`` it reads stream ``w`` only; yields the batch dicts of
    :class:`streamssl.data.loader.AudioBatchDataset` with ``position`` = the batch's place in the
    rank's epoch.
    """

    def __init__(self, tindex: TarredIndex, noise_index: ManifestIndex | None = None, *, batch_seconds: float,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 sample_rate: int = 16000, num_buckets: int = 30, max_batch_size: int | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 1000, strict: bool = False,
                 noise_cache_mb: float = 256.0):
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.tindex = tindex
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.streams_per_rank = max(1, int(num_workers))
        self.sample_rate = int(sample_rate)
        self.shuffle, self.shuffle_buffer, self.strict = bool(shuffle), int(shuffle_buffer), bool(strict)
        self.batch_seconds = float(batch_seconds)
        # Bucket edges and per-bucket batch sizes exactly as the per-file sampler computes them.
        buckets = BucketBatchSampler(tindex.index, batch_seconds, seed=seed, num_buckets=num_buckets,
                                     max_batch_size=max_batch_size, shuffle=shuffle)
        self._bucket_of, self._bucket_cap = buckets._bucket_of, buckets._bucket_cap
        self._shard_seconds = tindex.shard_seconds
        order = np.argsort(tindex.shard_ids, kind="stable")  # rows of each shard, in manifest order
        per_shard = np.bincount(tindex.shard_ids, minlength=len(tindex.shards))
        self._rows_by_shard = np.split(order, np.cumsum(per_shard)[:-1])
        self._noise = (AudioBatchDataset(noise_index, noise_index, sample_rate=sample_rate, seed=seed, strict=strict,
                                         noise_cache_mb=noise_cache_mb) if noise_index is not None else None)
        self.epoch, self.position = 0, 0
        self._plan_cache: tuple[int, _RankPlan] | None = None
        # Most member bytes a reader held at once (this process's readers: num_workers=0).
        self.peak_held_bytes = 0
        # Assigning shards needs at least one per rank: fail at construction, not mid-run.
        assign_shards(self._shard_seconds, self.world_size, 1, seed=seed, epoch=0, shuffle=shuffle)

    # -- plan --------------------------------------------------------------------------------------
    def _stream(self, shards: list[int], epoch: int, rank: int, worker: int) -> _Stream:
        parts = [self._rows_by_shard[s] for s in shards]
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        shard_start = np.r_[0, np.cumsum([p.shape[0] for p in parts])].astype(np.int64)
        L = rows.shape[0]
        if L == 0:
            return _Stream(shards, rows, shard_start, [])
        pos = np.arange(L)
        if self.shuffle:  # shuffle inside consecutive blocks of shuffle_buffer utterances
            key = np.random.default_rng([self.seed, epoch, rank, worker, _BLOCK_SALT]).random(L)
            pos = np.lexsort((key, pos // self.shuffle_buffer))
        bucket = self._bucket_of[rows[pos]].astype(np.int64)
        # Batches are cut per (window, bucket): an open batch closes at its window's end at the latest.
        window = np.arange(L) // (self.shuffle_buffer * WINDOW_BLOCKS)
        group = window * (int(self._bucket_cap.shape[0]) + 1) + bucket
        o = np.argsort(group, kind="stable")  # by window, then bucket, in emission order inside each
        g_sorted = group[o]
        new_run = np.r_[True, g_sorted[1:] != g_sorted[:-1]]
        run_start = np.flatnonzero(new_run)
        run_id = np.cumsum(new_run) - 1
        k_in_run = np.arange(L) - run_start[run_id]
        starts = np.flatnonzero(k_in_run % self._bucket_cap[bucket[o]] == 0)
        ends = np.r_[starts[1:], L]
        # A batch closes when its last member is emitted: order batches by that moment.
        batches = [pos[o[s:e]] for s, e in zip(starts, ends)]
        close = o[ends - 1]  # emission index of each batch's last member
        batches = [batches[i] for i in np.argsort(close, kind="stable")]
        return _Stream(shards, rows, shard_start, batches)

    def _build_plan(self, epoch: int) -> _RankPlan:
        assignment = assign_shards(self._shard_seconds, self.world_size, self.streams_per_rank, seed=self.seed,
                                   epoch=epoch, shuffle=self.shuffle)
        counts = [sum(len(self._stream(sh, epoch, r, w).batches) for w, sh in enumerate(ws)) if r != self.rank else None
                  for r, ws in enumerate(assignment)]
        streams = [self._stream(sh, epoch, self.rank, w) for w, sh in enumerate(assignment[self.rank])]
        counts[self.rank] = sum(len(s.batches) for s in streams)
        need = max(counts) - counts[self.rank]
        rng = np.random.default_rng([self.seed, epoch, self.rank, _SHARD_SALT])
        while need > 0:  # split the largest batches (ties broken at random) until the counts match
            cand = [(w, j) for w, s in enumerate(streams) for j, b in enumerate(s.batches) if b.shape[0] >= 2]
            if not cand:
                break
            sizes = np.array([streams[w].batches[j].shape[0] for w, j in cand])
            pick = np.lexsort((rng.random(len(cand)), -sizes))[:need]
            for w, j in sorted((cand[i] for i in pick), reverse=True):  # back to front keeps indices valid
                b = streams[w].batches[j]
                streams[w].batches[j:j + 1] = [b[:b.shape[0] // 2], b[b.shape[0] // 2:]]
            need -= len(pick)
        if need > 0 and not any(s.batches for s in streams):
            raise ValueError(f"{KEY}: rank {self.rank} was dealt shards {[s.shards for s in streams]} in epoch "
                             f"{epoch}, which hold no utterance within the duration filter; other ranks have batches")
        w = 0
        while need > 0:  # fewer utterances than batches needed: repeat a worker's last batch
            if streams[w].batches:
                streams[w].batches.append(streams[w].batches[-1])
                need -= 1
            w = (w + 1) % len(streams)
        return _RankPlan(streams)

    def plan(self, epoch: int | None = None) -> _RankPlan:
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._build_plan(epoch))
        return self._plan_cache[1]

    def streams_state(self, epoch: int, position: int) -> list[dict]:
        plan = self.plan(epoch)
        out = []
        for w, s in enumerate(plan.streams):
            i, off = s.resume_point(plan.first_local(w, position))
            out.append({"shards": list(s.shards), "shard_index": i, "member_offset": off})
        return out

    # -- reading -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch, position = self.epoch, self.position
        plan = self.plan(epoch)
        if worker >= len(plan.streams):
            return
        stream = plan.streams[worker]
        first = plan.first_local(worker, position)
        ks = np.flatnonzero(plan.worker == worker)  # rank positions of this worker's batches
        if first >= len(stream.batches):
            return
        start_shard, _ = stream.resume_point(first)
        reader = _ShardReader(self, stream, first, start_shard)
        for j in range(first, len(stream.batches)):
            k = int(ks[j])
            yield self._assemble(reader, stream, stream.batches[j], epoch, k)

    def _assemble(self, reader: "_ShardReader", stream: _Stream, positions: np.ndarray, epoch: int, k: int) -> dict:
        skipped: list[tuple[str, str]] = []
        idx = self.tindex.index
        rows = stream.rows[positions]
        sr = self.sample_rate
        caps = np.maximum(np.rint(idx.durations[rows] * sr), 1)
        audio = np.zeros((len(rows), int(caps.max()) if len(rows) else 0), dtype=np.float32)
        kept, rws, lens = [], [], []
        for r, p in enumerate(positions.tolist()):
            data, name = reader.take(p)
            row = int(stream.rows[p])
            if isinstance(data, str):  # a reason: the member was not there
                if self.strict:
                    raise AudioReadError(name, data)
                skipped.append((name, data))
                continue
            try:
                x = _pcm16_wav(data, float(idx.offsets[row]), float(idx.durations[row]), sr, audio[r])
                if x is None:  # anything but mono 16-bit WAV at the target rate: libsndfile
                    x = load_audio(io.BytesIO(data), float(idx.offsets[row]), float(idx.durations[row]), sr,
                                   out=audio[r], name=name)
            except AudioReadError as e:
                if self.strict:
                    raise
                skipped.append((e.path, e.reason))
                continue
            kept.append(row)
            rws.append(r)
            lens.append(x.shape[0])
        lengths = np.array(lens, dtype=np.int64)
        n_max = int(lengths.max()) if lens else 0
        if len(rws) != len(rows) or n_max != audio.shape[1]:
            audio = np.ascontiguousarray(audio[rws, :n_max])
        gid = k * self.world_size + self.rank  # unique per epoch across ranks, as the per-file loader's
        out = {"audio": torch.from_numpy(audio), "audio_lengths": torch.from_numpy(lengths),
               "indices": torch.tensor(kept, dtype=torch.int64)}
        if self._noise is not None:  # the per-file loader's crops, drawn per requested utterance
            rng = np.random.default_rng([self.seed, int(epoch), gid, _NOISE_SALT])
            draws = rng.random((len(rows), 2))
            noise = np.zeros_like(audio)
            noise_lengths = np.zeros(len(lens), dtype=np.int64)
            for i, (r, n) in enumerate(zip(rws, lens)):
                x = self._noise._noise_crop(n, draws[r, 0], draws[r, 1], skipped)
                if x is not None:
                    noise[i, :x.shape[0]] = x
                    noise_lengths[i] = x.shape[0]
            out["noise"] = torch.from_numpy(noise)
            out["noise_lengths"] = torch.from_numpy(noise_lengths)
        out.update(skipped=skipped, epoch=int(epoch), batch_id=gid, position=int(k))
        return out


def _pcm16_wav(data: bytes, offset: float, duration: float, sr: int, out: np.ndarray) -> np.ndarray | None:
    """Decode a mono 16-bit PCM WAV member at rate ``sr`` straight from its bytes into ``out`` (what
    libsndfile gives: int16 / 32768), skipping libsndfile's Python file callbacks; None for any
    other content (then :func:`load_audio` decodes it, and reports what is wrong)."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt_ok = 12, False
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt ":
            if size < 16:
                return None
            def u(a: int, b: int) -> int:
                return int.from_bytes(data[body + a:body + b], "little")

            tag, ch, rate, bits = u(0, 2), u(2, 4), u(4, 8), u(14, 16)
            fmt_ok = tag == 1 and ch == 1 and bits == 16 and rate == sr
            if not fmt_ok:
                return None
        elif cid == b"data":
            if not fmt_ok:
                return None
            total = min(size, len(data) - body) // 2
            start = int(round(offset * sr))
            n = min(max(1, int(round(duration * sr))), total - start)
            if start >= total or n <= 0 or n > out.shape[0]:
                return None
            x = np.frombuffer(data, dtype="<i2", count=n, offset=body + 2 * start)
            np.multiply(x, np.float32(1 / 32768), out=out[:n], casting="unsafe")
            return out[:n]
        pos = body + size + (size & 1)
    return None


class _ShardReader:
    """Reads one stream's shards front to back, holding the bytes of members still to be batched."""

    def __init__(self, ds: ShardStreamDataset, stream: _Stream, first_batch: int, start_shard: int):
        self.ds, self.stream = ds, stream
        self.names: dict[int, str] = {}
        self.uses: dict[tuple[int, str], int] = {}  # (shard index, member) -> remaining uses
        for b in stream.batches[first_batch:]:
            for p in b.tolist():
                key = self._key(p)
                self.uses[key] = self.uses.get(key, 0) + 1
        self.held: dict[tuple[int, str], bytes] = {}
        self.held_bytes = 0
        self.cur = start_shard  # shard index being read
        self.done_reason: dict[int, str] = {}  # finished shards -> why a member could be absent
        self._tar = None
        self._it = None

    def _key(self, p: int) -> tuple[int, str]:
        i = int(np.searchsorted(self.stream.shard_start, p, side="right") - 1)
        return i, self.ds.tindex.member(int(self.stream.rows[p]))

    def _label(self, i: int, name: str) -> str:
        return f"{self.ds.tindex.shards[self.stream.shards[i]]}:{name}"

    def _advance(self) -> None:
        """Read the next member of the current shard (opening / closing shards as needed)."""
        path = self.ds.tindex.shards[self.stream.shards[self.cur]]
        if self._tar is None:
            try:
                self._tar = tarfile.open(path, "r:")
                self._it = iter(self._tar)
            except (OSError, tarfile.TarError) as e:
                self._finish(f"unreadable shard: {e}")
                return
        try:
            m = next(self._it, None)
            if m is None:
                self._finish("member not in the shard")
                return
            key = (self.cur, os.path.basename(m.name))
            if m.isfile() and key in self.uses and key not in self.held:
                f = self._tar.extractfile(m)
                self.held[key] = f.read()
                self.held_bytes += len(self.held[key])
                self.ds.peak_held_bytes = max(self.ds.peak_held_bytes, self.held_bytes)
        except (OSError, tarfile.TarError, EOFError) as e:
            self._finish(f"shard ends early or is corrupt: {e}")

    def _finish(self, reason: str) -> None:
        if self.ds.strict and reason != "member not in the shard":
            raise AudioReadError(self.ds.tindex.shards[self.stream.shards[self.cur]], reason)
        if self._tar is not None:
            self._tar.close()
        self._tar = self._it = None
        self.done_reason[self.cur] = reason
        self.cur += 1

    def take(self, p: int) -> tuple[bytes | str, str]:
        """(bytes, label) of stream position ``p``'s member, or (reason, label) when it is absent."""
        key = self._key(p)
        while key not in self.held and key[0] not in self.done_reason:
            self._advance()
        label = self._label(*key)
        left = self.uses[key] - 1
        if key in self.held:
            data = self.held[key]
            if left == 0:
                del self.held[key]
                self.held_bytes -= len(data)
        else:
            data = self.done_reason[key[0]]
        self.uses[key] = left
        return data, label


class ShardLoader:
    """Iterable over a rank's batches from tar shards, resumable at consumed batches.

    The interface of :class:`streamssl.data.loader.AudioLoader`: ``for batch in loader`` runs the
    rest of the current epoch and then advances to the next; ``state_dict()`` = {"epoch",
    "position" (batches of the epoch handed out on this rank), "num_skipped", the plan-defining
    settings, and ``streams``: per worker of this rank, its shard order, the shard index and member
    offset its next batch reads from}. Ranks advance in lockstep, so rank 0's state resumes every
    rank; resuming needs the same world size and number of workers.
    """

    def __init__(self, dataset: ShardStreamDataset, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = 2, multiprocessing_context=None):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.epoch, self.position, self.num_skipped = 0, 0, 0

    def __len__(self) -> int:
        return len(self.dataset.plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.epoch, self.position
        ds = self.dataset
        ds.epoch, ds.position = epoch, start
        ds.plan(epoch)  # built once here, inherited by the workers
        kwargs = {}
        if self.num_workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context)
        dl = DataLoader(ds, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                        pin_memory=self.pin_memory, **kwargs)
        pending: dict[int, dict] = {}
        nxt = start
        for batch in dl:  # the DataLoader alternates workers as the plan does; reorder just in case
            pending[batch["position"]] = batch
            while nxt in pending:
                b = pending.pop(nxt)
                nxt += 1
                self.position = nxt
                if b["skipped"]:
                    self.num_skipped += len(b["skipped"])
                    for path, reason in b["skipped"]:
                        log.warning("skipped unreadable audio %s: %s (%d skipped so far)", path, reason,
                                    self.num_skipped)
                yield b
        if pending or nxt != len(ds.plan(epoch)):
            raise RuntimeError(f"shard loader: epoch {epoch} ended at batch {nxt} of {len(ds.plan(epoch))}")
        self.epoch, self.position = epoch + 1, 0

    def _settings(self) -> dict:
        ds = self.dataset
        return {"seed": ds.seed, "world_size": ds.world_size, "num_workers": ds.streams_per_rank,
                "num_utterances": len(ds.tindex), "num_shards": len(ds.tindex.shards),
                "batch_seconds": ds.batch_seconds, "shuffle_buffer": ds.shuffle_buffer}

    def state_dict(self) -> dict:
        state = {"kind": "shards", "epoch": self.epoch, "position": self.position, "num_skipped": self.num_skipped,
                 "rank": self.dataset.rank, **self._settings()}
        state["streams"] = self.dataset.streams_state(self.epoch, self.position)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards":
            raise ValueError("cannot resume the data position: the checkpoint was written reading a manifest "
                             f"file by file, this run reads tar shards ({KEY})")
        epoch, position = check_resume_settings(state, self._settings(), "the shard plan would differ")
        if state.get("rank", 0) == self.dataset.rank and "streams" in state:
            if state["streams"] != self.dataset.streams_state(epoch, position):
                raise ValueError("cannot resume the data position: the saved shard order / offsets do not match "
                                 "this run's plan (were the shards or the tarred manifest changed?)")
        self.epoch, self.position = epoch, position
        self.num_skipped = int(state.get("num_skipped", 0))


def build_shard_loader(tindex: TarredIndex, noise_index: ManifestIndex | None = None, *, batch_seconds: float,
                       seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                       sample_rate: int = 16000, num_buckets: int = 30, max_batch_size: int | None = None,
                       shuffle: bool = True, shuffle_buffer: int = 1000, strict: bool = False,
                       pin_memory: bool = False, prefetch_factor: int | None = 2, noise_cache_mb: float = 256.0,
                       multiprocessing_context=None) -> ShardLoader:
    """Streaming, sharded, resumable loader over tar shards (module docstring); arguments as
    :func:`streamssl.data.loader.build_loader`, plus ``shuffle_buffer`` (utterances)."""
    ds = ShardStreamDataset(tindex, noise_index, batch_seconds=batch_seconds, seed=seed, rank=rank,
                            world_size=world_size, num_workers=num_workers, sample_rate=sample_rate,
                            num_buckets=num_buckets, max_batch_size=max_batch_size, shuffle=shuffle,
                            shuffle_buffer=shuffle_buffer, strict=strict, noise_cache_mb=noise_cache_mb)
    return ShardLoader(ds, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       multiprocessing_context=multiprocessing_context)
