"""Duration-bucketed dynamic batches, reproducible per (seed, epoch), sharded over DDP ranks.

Each epoch's plan is a pure function of (durations, sources, weights, seed, epoch, settings), so any
rank can rebuild it and a resumed run skips exactly the batches it had consumed.

How an epoch is planned:

1. Utterances are visited ``weight`` times per epoch per manifest: ``floor(w)`` full passes plus a
   random ``frac(w)`` of that manifest (drawn from the epoch's generator).
2. They are grouped into buckets whose edges are duration quantiles of the whole index, shuffled
   inside each bucket, and cut into batches of ``floor(batch_seconds / max duration of the bucket)``
   utterances (at most ``max_batch_size``). Padded seconds ``len(batch) * max(duration)`` therefore
   never exceed ``batch_seconds``; every utterance is in exactly one batch.
3. If the number of batches is not a multiple of ``world_size``, the largest batches are split in
   two until it is, so every rank gets the same number of batches (DDP never waits on a rank that
   ran out) and still no utterance is repeated. Only when no batch has two utterances left to split
   (a corpus with fewer utterances than ranks, say) are batches repeated instead.
4. The batch order is shuffled; rank ``r`` takes batches ``r, r + world_size, ...``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .manifest import ManifestIndex

__all__ = ["BucketBatchSampler", "EpochPlan"]

# A bucket's last batch is partial; keeping the number of buckets under a quarter of the batches
# per epoch bounds that waste to about 1/8 of the epoch even on tiny corpora.
_MIN_BATCHES_PER_BUCKET = 4


class EpochPlan:
    """The batches of one epoch for one rank: ``batch(k)`` -> (n,) int64 utterance indices.

    ``global_id(k)`` is the batch's position in the epoch across all ranks (unique per epoch),
    used to seed per-batch randomness independently of the rank count and worker assignment.
    """

    def __init__(self, flat: np.ndarray, starts: np.ndarray, order: np.ndarray, rank: int, world_size: int):
        self._flat = flat
        self._starts = starts
        self._global = order.shape[0]
        self._mine = order[rank::world_size]
        self._rank = rank
        self._world = world_size

    def __len__(self) -> int:
        return int(self._mine.shape[0])

    @property
    def num_global_batches(self) -> int:
        return int(self._global)

    def batch(self, k: int) -> np.ndarray:
        b = int(self._mine[k])
        return self._flat[self._starts[b]:self._starts[b + 1]]

    def global_id(self, k: int) -> int:
        return k * self._world + self._rank



def check_resume_settings(state: dict, settings: dict, consequence: str) -> tuple[int, int]:
    """(epoch, position) of a loader state whose plan-defining ``settings`` still hold.

    Raises ValueError naming the first setting that changed since the state was saved.
    """
    for key, mine in settings.items():
        if key in state and state[key] != mine:
            raise ValueError(f"cannot resume the data position: {key} was {state[key]} when it was "
                             f"saved and is {mine} now ({consequence})")
    epoch, position = int(state["epoch"]), int(state["position"])
    if position < 0:
        raise ValueError(f"state['position'] must be >= 0, got {position}")
    return epoch, position

class BucketBatchSampler:
    """Batch sampler with a padded-seconds budget per batch (see the module docstring).

    Args:
        index: a :class:`ManifestIndex` (its durations, sources and weights are used) or a (N,)
            array of durations in seconds (one source, weight 1).
        batch_seconds: budget per batch: ``len(batch) * max(duration in batch) <= batch_seconds``.
        seed: the shuffles of epoch ``e`` depend only on ``(seed, e)``.
        rank, world_size: DDP sharding; every rank gets the same number of batches.
        num_buckets: upper bound on duration buckets (reduced for small corpora, see
            ``_MIN_BATCHES_PER_BUCKET``); the effective number is ``self.num_buckets``.
        max_batch_size: optional cap on utterances per batch.
        shuffle: False keeps buckets and utterances in index order (for evaluation).

    Iterating yields lists of utterance indices for the rest of the current epoch, then moves on
    to the next epoch, so a plain loop over epochs needs no ``set_epoch``. ``state_dict()`` holds
    (epoch, position) and ``load_state_dict`` resumes there exactly.
    """

    def __init__(self, index: ManifestIndex | np.ndarray, batch_seconds: float, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_buckets: int = 30,
                 max_batch_size: int | None = None, shuffle: bool = True):
        if isinstance(index, ManifestIndex):
            durations, sources, weights = index.durations, index.sources, index.weights
        else:
            durations = np.asarray(index, dtype=np.float64)
            sources = np.zeros(durations.shape[0], dtype=np.int16)
            weights = np.ones(1)
        if durations.ndim != 1 or durations.shape[0] == 0:
            raise ValueError(f"index: expected a non-empty 1-D duration array, got shape {durations.shape}")
        if not np.all(durations > 0):
            raise ValueError("index: durations must be positive")
        if not (batch_seconds > 0):
            raise ValueError(f"batch_seconds must be > 0, got {batch_seconds}")
        longest = float(durations.max())
        if longest > batch_seconds:
            raise ValueError(
                f"batch_seconds={batch_seconds} is shorter than the longest utterance ({longest:.2f} s); "
                f"raise batch_seconds or load the manifest with max_duration={batch_seconds}")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if not (1 <= num_buckets <= 10000):
            raise ValueError(f"num_buckets must be in [1, 10000], got {num_buckets}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.durations = durations
        self.batch_seconds = float(batch_seconds)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_batch_size = max_batch_size
        self.shuffle = bool(shuffle)
        self._weights = np.asarray(weights, dtype=np.float64)
        # int32 utterance ids halve the per-epoch plan (N < 2**31 always holds in practice).
        self._idx_dtype = np.int32 if durations.shape[0] < 2 ** 31 else np.int64
        self._by_source = [np.flatnonzero(sources == m).astype(self._idx_dtype)
                           for m in range(len(self._weights))]

        # Expected batches per epoch, from the weighted padded-free total; caps the bucket count.
        total = sum(float(durations[ix].sum()) * w for ix, w in zip(self._by_source, self._weights))
        est_batches = total / self.batch_seconds
        nb = int(max(1, min(num_buckets, est_batches // _MIN_BATCHES_PER_BUCKET)))
        qs = np.quantile(durations, np.linspace(0.0, 1.0, nb + 1)[1:-1]) if nb > 1 else np.zeros(0)
        self._edges = np.unique(qs)
        self.num_buckets = int(self._edges.shape[0] + 1)
        self._bucket_of = np.searchsorted(self._edges, durations, side="right").astype(np.int16)
        bucket_max = np.zeros(self.num_buckets)
        np.maximum.at(bucket_max, self._bucket_of, durations)
        cap = np.floor(self.batch_seconds / np.maximum(bucket_max, 1e-12)).astype(np.int64)
        if max_batch_size is not None:
            cap = np.minimum(cap, max_batch_size)
        self._bucket_cap = np.maximum(cap, 1)  # empty buckets: any positive value

        self.epoch = 0
        self.position = 0
        self._plan_cache: tuple[int, EpochPlan] | None = None

    # -- plan -------------------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's batches for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        plan = self._build_plan(epoch)
        self._plan_cache = (epoch, plan)
        return plan

    def _build_plan(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for ix, w in zip(self._by_source, self._weights):
            reps = int(np.floor(w))
            parts.extend([ix] * reps)
            n_frac = int(round((w - reps) * ix.shape[0]))
            if n_frac:
                parts.append(np.sort(rng.choice(ix, size=n_frac, replace=False)))
        items = np.concatenate(parts) if parts else np.zeros(0, self._idx_dtype)
        if items.shape[0] == 0:
            raise ValueError("the manifest weights select no utterance for this epoch")
        if self.shuffle:
            items = items[rng.permutation(items.shape[0])]
        bucket = self._bucket_of[items]
        sort = np.argsort(bucket, kind="stable")  # group by bucket, keep the shuffled order inside
        items, bucket = items[sort], bucket[sort]
        # Cut each bucket's run into batches of cap[bucket] utterances.
        n = items.shape[0]
        run_start = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        run_id = np.cumsum(np.r_[True, bucket[1:] != bucket[:-1]]) - 1
        pos = np.arange(n) - run_start[run_id]
        is_start = (pos % self._bucket_cap[bucket]) == 0
        starts = np.r_[np.flatnonzero(is_start), n].astype(np.int64)
        starts = self._balance(starts, rng)
        nbatch = starts.shape[0] - 1
        if starts[-1] > n:  # _balance repeated the first batches: append copies of their items
            items = np.concatenate([items, items[:starts[-1] - n]])
        order = rng.permutation(nbatch) if self.shuffle else np.arange(nbatch)
        return EpochPlan(items, starts, order, self.rank, self.world_size)

    def _balance(self, starts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Make the number of batches a multiple of world_size (module docstring, step 3)."""
        ws = self.world_size
        need = (-(starts.shape[0] - 1)) % ws
        while need:
            sizes = np.diff(starts)
            # Largest first; the generator breaks ties so equal-size batches are split fairly.
            cand = np.lexsort((rng.random(sizes.shape[0]), -sizes))
            cand = cand[sizes[cand] >= 2][:need]
            if cand.shape[0] == 0:
                break
            mids = starts[cand] + sizes[cand] // 2
            starts = np.sort(np.concatenate([starts, mids]))
            need -= cand.shape[0]
        if need:
            # Fewer splittable batches than ranks: repeat the first `need` batches' utterances,
            # appended after the end of the item array (materialised by the caller).
            n = starts[-1]
            sizes = np.diff(starts)[:need]
            starts = np.concatenate([starts, n + np.cumsum(sizes)])
        return starts

    # -- iteration and state ----------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank (the whole current epoch, not what is left of it)."""
        return len(self.plan())

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``; a no-op when already in it (keeps a resumed position)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def iter_batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(epoch, global_batch_id, indices)`` for the rest of the epoch, then advance it."""
        plan = self.plan()
        epoch = self.epoch
        while self.position < len(plan):
            k = self.position
            self.position = k + 1  # counted when handed out
            yield epoch, plan.global_id(k), plan.batch(k)
        self.epoch, self.position = epoch + 1, 0
        self._plan_cache = None

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, idx in self.iter_batches():
            yield idx.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "num_utterances": int(self.durations.shape[0]),
                "batch_seconds": self.batch_seconds}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s (epoch, position). The plan-defining settings must match."""
        epoch, position = check_resume_settings(
            state, {"seed": self.seed, "world_size": self.world_size,
                    "num_utterances": int(self.durations.shape[0]), "batch_seconds": self.batch_seconds},
            "the batch plan would differ")
        self.epoch, self.position = epoch, position
        self._plan_cache = None
