"""Batches of padded audio (+ noise crops) from a manifest index, in DataLoader workers.

Workers read whole batches (a list of utterance indices from :class:`BucketBatchSampler`), so
padding happens in the worker and the main process only receives tensors. The position saved in
:meth:`AudioLoader.state_dict` counts batches *handed to the trainer*, not batches prefetched by
workers, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .audio import AudioReadError, load_audio
from .manifest import ManifestIndex
from .sampler import BucketBatchSampler

__all__ = ["AudioBatchDataset", "AudioLoader", "build_loader"]

log = logging.getLogger("streamssl.data")

# Salt separating the noise-crop stream from the sampler's (seed, epoch) stream.
_NOISE_SALT = 0x6E6F697365


class AudioBatchDataset(Dataset):
    """Map-style dataset whose items are whole batches.

    ``dataset[(epoch, global_batch_id, position, indices)]`` returns a dict:
        audio:          (B, N) float32, zero-padded.
        audio_lengths:  (B,) int64.
        indices:        (B,) int64, rows of the manifest index that were read.
        noise:          (B, N) float32, only with a noise index: a crop per utterance of its length.
        noise_lengths:  (B,) int64, 0 where the noise file could not be read.
        skipped:        list of (path, reason) for files that failed (those rows are absent).
        epoch, batch_id, position: ints identifying the batch.
    Noise crops are drawn from ``numpy.random.default_rng([seed, epoch, global_batch_id, salt])``,
    so they do not depend on the worker that reads them nor on the number of workers: a noise
    file is picked with probability proportional to its duration and a window of the utterance's
    length starts uniformly inside it (a shorter file is looped). When the whole noise set fits in
    ``noise_cache_mb`` (float32), each worker decodes it once and crops from memory.
    With ``strict=True`` an unreadable file raises :class:`AudioReadError` instead.
    """

    def __init__(self, index: ManifestIndex, noise_index: ManifestIndex | None = None, *,
                 sample_rate: int = 16000, seed: int = 0, strict: bool = False,
                 noise_cache_mb: float = 256.0):
        self.index = index
        self.noise_index = noise_index
        self.sample_rate = int(sample_rate)
        self.seed = int(seed)
        self.strict = bool(strict)
        self._noise_cache: dict[int, np.ndarray] | None = None
        if noise_index is not None:
            self._noise_cum = np.cumsum(noise_index.durations)
            # A noise set that fits is decoded once per worker and cropped from memory; a larger
            # one is read crop by crop (random crops would only thrash a partial cache).
            if noise_index.total_seconds * self.sample_rate * 4 <= noise_cache_mb * 2 ** 20:
                self._noise_cache = {}

    def __len__(self) -> int:  # a DataLoader with batch_size=None never asks, but be honest
        return len(self.index)

    def _read(self, i: int, skipped: list, out: np.ndarray) -> np.ndarray | None:
        path = self.index.path(i)
        try:
            return load_audio(path, float(self.index.offsets[i]), float(self.index.durations[i]),
                              self.sample_rate, out=out)
        except AudioReadError as e:
            if self.strict:
                raise
            skipped.append((e.path, e.reason))
            return None

    def _noise_crop(self, length: int, u_file: float, u_pos: float, skipped: list) -> np.ndarray | None:
        nidx = self.noise_index
        j = int(np.searchsorted(self._noise_cum, u_file * self._noise_cum[-1], side="right"))
        j = min(j, len(nidx) - 1)
        path = nidx.path(j)
        sr = self.sample_rate
        n_avail = int(round(float(nidx.durations[j]) * sr))
        start = int(u_pos * (n_avail - length + 1)) if n_avail > length else 0
        try:
            if self._noise_cache is not None:
                x = self._noise_cache.get(j)
                if x is None:
                    x = self._noise_cache[j] = load_audio(path, float(nidx.offsets[j]),
                                                          float(nidx.durations[j]), sr)
                x = x[start:start + length]
            elif n_avail > length:
                x = load_audio(path, float(nidx.offsets[j]) + start / sr, length / sr, sr)
            else:
                x = load_audio(path, float(nidx.offsets[j]), float(nidx.durations[j]), sr)
        except AudioReadError as e:
            if self.strict:
                raise
            skipped.append((e.path, e.reason))
            return None
        if x.shape[0] < length:  # short noise file (or resampler rounding): loop it
            x = np.tile(x, -(-length // x.shape[0]))
        return x[:length]

    def __getitem__(self, ref) -> dict:
        epoch, batch_id, position, indices = ref
        skipped: list[tuple[str, str]] = []
        requested = np.asarray(indices).tolist()
        # Rows sized from the manifest (load_audio returns at most round(duration * sr) samples),
        # so every file is decoded straight into its row: no second copy, no second page fault.
        caps = np.maximum(np.rint(self.index.durations[np.asarray(indices, dtype=np.int64)] * self.sample_rate), 1)
        audio = np.zeros((len(requested), int(caps.max()) if len(requested) else 0), dtype=np.float32)
        kept, rows, lens = [], [], []
        for row, i in enumerate(requested):
            x = self._read(i, skipped, audio[row])
            if x is not None:
                kept.append(i)
                rows.append(row)
                lens.append(x.shape[0])
        lengths = np.array(lens, dtype=np.int64)
        n_max = int(lengths.max()) if lens else 0
        if len(rows) != len(requested) or n_max != audio.shape[1]:  # failures or short files: rare
            audio = np.ascontiguousarray(audio[rows, :n_max])
        out = {"audio": torch.from_numpy(audio), "audio_lengths": torch.from_numpy(lengths),
               "indices": torch.tensor(kept, dtype=torch.int64)}
        if self.noise_index is not None:
            # One pair of draws per *requested* utterance, so the crops of the others do not
            # depend on which files happened to fail.
            rng = np.random.default_rng([self.seed, int(epoch), int(batch_id), _NOISE_SALT])
            draws = rng.random((len(requested), 2))
            noise = np.zeros_like(audio)
            noise_lengths = np.zeros(len(lens), dtype=np.int64)
            for r, (row, n) in enumerate(zip(rows, lens)):
                x = self._noise_crop(n, draws[row, 0], draws[row, 1], skipped)
                if x is not None:
                    noise[r, :x.shape[0]] = x
                    noise_lengths[r] = x.shape[0]
            out["noise"] = torch.from_numpy(noise)
            out["noise_lengths"] = torch.from_numpy(noise_lengths)
        out["skipped"] = skipped
        out["epoch"] = int(epoch)
        out["batch_id"] = int(batch_id)
        out["position"] = int(position)
        return out


class _RefSampler:
    """Feeds (epoch, global_batch_id, position, indices) refs from the batch sampler to the DataLoader."""

    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        start = self.sampler.position
        for k, (epoch, gid, idx) in enumerate(self.sampler.iter_batches(), start=start):
            yield epoch, gid, k, idx

    def __len__(self) -> int:
        return len(self.sampler)


def _identity(x):
    return x


class AudioLoader:
    """Iterable over the batches of :class:`AudioBatchDataset`, resumable at consumed batches.

    ``for batch in loader`` runs the rest of the current epoch and then advances to the next one
    (a trainer that counts steps can simply loop ``while True: for batch in loader: ...``).
    ``state_dict()`` = {"epoch", "position" (batches of the epoch already yielded on this rank),
    "num_skipped", and the sampler's plan-defining settings}. Ranks advance in lockstep, so rank
    0's state resumes every rank.

    Unreadable files are dropped from their batch and listed in ``batch["skipped"]`` (also logged
    and counted in ``num_skipped``). If *every* file of a batch fails, the batch is still yielded,
    with B = 0 (``audio`` of shape (0, 0)): under DDP the trainer must still take part in the step
    (e.g. a zero loss that touches every parameter) so the ranks stay in step.
    """

    def __init__(self, dataset: AudioBatchDataset, sampler: BucketBatchSampler, *, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = 2,
                 persistent_workers: bool = True, multiprocessing_context=None):
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = int(num_workers)
        self.epoch = sampler.epoch
        self.position = sampler.position
        self.num_skipped = 0
        kwargs = {}
        if self.num_workers > 0:
            kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                          multiprocessing_context=multiprocessing_context)
        self._dl = DataLoader(dataset, sampler=_RefSampler(sampler), batch_size=None,
                              collate_fn=_identity, num_workers=self.num_workers,
                              pin_memory=pin_memory, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch on this rank (whole current epoch)."""
        return len(self.sampler.plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``; a no-op when already in it (keeps a resumed position)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[dict]:
        # Re-aim the sampler at what was consumed: whatever workers prefetched before is dropped.
        self.sampler.load_state_dict({"epoch": self.epoch, "position": self.position})
        epoch = self.epoch
        for batch in self._dl:
            self.position = batch["position"] + 1  # consumed once handed out
            if batch["skipped"]:
                self.num_skipped += len(batch["skipped"])
                for path, reason in batch["skipped"]:
                    log.warning("skipped unreadable audio %s: %s (%d skipped so far)", path, reason,
                                self.num_skipped)
            yield batch
        self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict:
        state = self.sampler.state_dict()
        state.update(epoch=self.epoch, position=self.position, num_skipped=self.num_skipped)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)  # validates the plan settings
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.num_skipped = int(state.get("num_skipped", 0))


def build_loader(index: ManifestIndex, noise_index: ManifestIndex | None = None, *,
                 batch_seconds: float, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, sample_rate: int = 16000, num_buckets: int = 30,
                 max_batch_size: int | None = None, shuffle: bool = True, strict: bool = False,
                 pin_memory: bool = False, prefetch_factor: int | None = 2,
                 noise_cache_mb: float = 256.0, multiprocessing_context=None) -> AudioLoader:
    """Bucketed, sharded, resumable audio loader (see :class:`AudioBatchDataset` for the batch dict).

    Args:
        index: training utterances; noise_index: optional noise files (crops for augmentation).
        batch_seconds: padded-seconds budget per batch (``B * max duration <= batch_seconds``).
        seed: fixes the batch plan of every epoch and every noise crop.
        rank, world_size: DDP sharding; each rank gets the same number of batches per epoch.
        num_workers: DataLoader worker processes (0 reads in the calling process).
        strict: raise on the first unreadable file instead of skipping and counting it.
        noise_cache_mb: decode the noise set once per worker when it fits in this many MB.
    """
    sampler = BucketBatchSampler(index, batch_seconds, seed=seed, rank=rank, world_size=world_size,
                                 num_buckets=num_buckets, max_batch_size=max_batch_size, shuffle=shuffle)
    dataset = AudioBatchDataset(index, noise_index, sample_rate=sample_rate, seed=seed, strict=strict,
                                noise_cache_mb=noise_cache_mb)
    return AudioLoader(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context)
