import numpy as np
import pytest

from streamssl.data.manifest import ManifestIndex
from streamssl.data.sampler import BucketBatchSampler


def durations(n=2000, seed=0, lo=0.5, hi=20.0):
    return np.exp(np.random.default_rng(seed).uniform(np.log(lo), np.log(hi), n))


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return [np.asarray(b) for b in sampler]


def fake_index(durs, sources, weights):
    n = len(durs)
    return ManifestIndex(durations=np.asarray(durs, float), offsets=np.zeros(n), path_ids=np.zeros(n, np.int32),
                         sources=np.asarray(sources, np.int16), weights=np.asarray(weights, float),
                         manifests=[f"m{i}" for i in range(len(weights))],
                         path_bytes=np.frombuffer(b"/x", np.uint8).copy(), path_starts=np.array([0, 2]))


@pytest.mark.parametrize("n,budget,world", [(2000, 60.0, 2), (2000, 45.0, 3), (137, 30.0, 2), (57, 25.0, 4)])
def test_budget_and_exactly_once_across_ranks(n, budget, world):
    d = durations(n, seed=n)
    per_rank = []
    for rank in range(world):
        s = BucketBatchSampler(d, budget, seed=5, rank=rank, world_size=world)
        per_rank.append(epoch_batches(s, 3))
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks got different numbers of batches: {[len(b) for b in per_rank]}"
    everything = np.concatenate([np.concatenate(b) for b in per_rank])
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # every utterance exactly once
    for batches in per_rank:
        for b in batches:
            assert len(b) >= 1
            assert len(b) * d[b].max() <= budget + 1e-9
    # Bucketing keeps padding modest: padded seconds over real seconds for the whole epoch.
    padded = sum(len(b) * d[b].max() for r in per_rank for b in r)
    if n >= 1000:
        assert padded / d.sum() < 1.25


def test_odd_batch_count_is_balanced_by_splitting_not_repeating():
    d = np.full(7, 1.0)  # budget 2 s -> batches of 2,2,2,1: four batches, world 3 needs six
    s0 = BucketBatchSampler(d, 2.0, seed=0, rank=0, world_size=3)
    assert len(s0) == 2
    all_items = np.concatenate([np.concatenate(epoch_batches(BucketBatchSampler(d, 2.0, rank=r, world_size=3), 0))
                                for r in range(3)])
    np.testing.assert_array_equal(np.sort(all_items), np.arange(7))


def test_fewer_utterances_than_ranks_repeats_rather_than_hangs():
    d = np.array([1.0, 1.0, 1.0])
    per_rank = [epoch_batches(BucketBatchSampler(d, 1.5, rank=r, world_size=4), 0) for r in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert set(np.concatenate([b[0] for b in per_rank]).tolist()) == {0, 1, 2}


def test_reproducible_per_seed_and_epoch():
    d = durations(500)
    a = epoch_batches(BucketBatchSampler(d, 40.0, seed=1), 2)
    b = epoch_batches(BucketBatchSampler(d, 40.0, seed=1), 2)
    c = epoch_batches(BucketBatchSampler(d, 40.0, seed=1), 3)
    e = epoch_batches(BucketBatchSampler(d, 40.0, seed=2), 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, e))


def test_plain_iteration_advances_epochs():
    d = durations(200)
    s = BucketBatchSampler(d, 40.0, seed=1)
    first = [np.asarray(b) for b in s]
    assert s.epoch == 1 and s.position == 0
    second = [np.asarray(b) for b in s]
    ref = epoch_batches(BucketBatchSampler(d, 40.0, seed=1), 1)
    assert all(np.array_equal(x, y) for x, y in zip(second, ref))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("stop", [0, 1, 7])
def test_resume_from_state_dict_is_exact(stop):
    d = durations(300)
    ref = BucketBatchSampler(d, 40.0, seed=9, rank=1, world_size=2)
    ref.set_epoch(4)
    ref_batches = [np.asarray(b) for b in ref]

    s = BucketBatchSampler(d, 40.0, seed=9, rank=1, world_size=2)
    s.set_epoch(4)
    it = iter(s)
    got = [np.asarray(next(it)) for _ in range(stop)]
    state = s.state_dict()
    assert state["epoch"] == 4 and state["position"] == stop

    resumed = BucketBatchSampler(d, 40.0, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # a trainer re-announcing the epoch must not lose the position
    got += [np.asarray(b) for b in resumed]
    assert len(got) == len(ref_batches)
    assert all(np.array_equal(x, y) for x, y in zip(got, ref_batches))


def test_resume_with_other_settings_is_refused():
    d = durations(100)
    state = BucketBatchSampler(d, 40.0, seed=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        BucketBatchSampler(d, 40.0, seed=1, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(d, 40.0, seed=2, world_size=2).load_state_dict(state)


def test_manifest_weights_repeat_and_subsample():
    d = np.full(40, 1.0)
    idx = fake_index(d, [0] * 20 + [1] * 10 + [2] * 10, [1.0, 2.0, 0.5])
    s = BucketBatchSampler(idx, 4.0, seed=0)
    seen = []
    for epoch in range(2):
        items = np.concatenate(epoch_batches(s, epoch))
        counts = np.bincount(items, minlength=40)
        assert (counts[:20] == 1).all()
        assert (counts[20:30] == 2).all()
        assert counts[30:].sum() == 5 and counts[30:].max() == 1
        seen.append(set(np.flatnonzero(counts[30:]).tolist()))
    assert seen[0] != seen[1]  # a fresh half each epoch


def test_max_batch_size_and_no_shuffle():
    d = np.full(10, 0.5)
    s = BucketBatchSampler(d, 100.0, max_batch_size=3, shuffle=False)
    assert [b.tolist() for b in epoch_batches(s, 0)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="longest utterance"):
        BucketBatchSampler(np.array([1.0, 30.0]), 20.0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(np.array([1.0]), 20.0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_seconds"):
        BucketBatchSampler(np.array([1.0]), 0.0)
    with pytest.raises(ValueError, match="durations"):
        BucketBatchSampler(np.array([1.0, 0.0]), 10.0)
