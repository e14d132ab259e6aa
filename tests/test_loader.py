import json

import numpy as np
import pytest
import torch

from data_fixtures import SR, make_corpus
from streamssl.data.audio import AudioReadError, load_audio
from streamssl.data.loader import build_loader
from streamssl.data.manifest import load_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    train, waves = make_corpus(root, n=14, seed=0, min_s=0.2, max_s=1.0)
    noise, noise_waves = make_corpus(root, n=3, seed=1, min_s=0.3, max_s=1.5, name="noise")
    return load_manifest(train), load_manifest(noise), waves, noise_waves, root


def take(loader, k):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == k:
            break
    return out


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["epoch"] == y["epoch"] and x["position"] == y["position"]
        assert torch.equal(x["indices"], y["indices"])
        assert torch.equal(x["audio"], y["audio"]) and torch.equal(x["noise"], y["noise"])


def test_batches_hold_the_padded_audio_of_their_utterances(corpus):
    index, noise, waves, _, _ = corpus
    loader = build_loader(index, noise, batch_seconds=3.0, seed=0)
    seen = []
    for batch in loader:
        a, lens, idx = batch["audio"], batch["audio_lengths"], batch["indices"]
        assert a.dtype == torch.float32 and lens.dtype == torch.int64 and idx.dtype == torch.int64
        assert a.shape == (len(idx), int(lens.max()))
        assert batch["noise"].shape == a.shape
        torch.testing.assert_close(batch["noise_lengths"], lens, rtol=0, atol=0)
        assert len(idx) * a.shape[1] <= 3.0 * SR
        for r, i in enumerate(idx.tolist()):
            np.testing.assert_array_equal(a[r, :lens[r]].numpy(), waves[i] / np.float32(32768))
            assert not a[r, lens[r]:].any() and not batch["noise"][r, lens[r]:].any()
        assert batch["skipped"] == []
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(index)))
    assert loader.epoch == 1 and loader.position == 0


def test_noise_crops_are_windows_of_noise_files_and_deterministic(corpus):
    index, noise, _, noise_waves, _ = corpus
    ref = take(build_loader(index, noise, batch_seconds=3.0, seed=4), 3)
    again = take(build_loader(index, noise, batch_seconds=3.0, seed=4), 3)
    same_batches(ref, again)

    def crops(batches):
        return {i: b["noise"][r, :b["noise_lengths"][r]] for b in batches for r, i in enumerate(b["indices"].tolist())}

    a, b = crops(list(build_loader(index, noise, batch_seconds=3.0, seed=4))), \
        crops(list(build_loader(index, noise, batch_seconds=3.0, seed=5)))
    assert sum(not torch.equal(a[i], b[i]) for i in a) >= len(a) // 2  # another seed, other crops
    sources = [w / np.float32(32768) for w in noise_waves]
    for batch in ref:
        for r in range(batch["noise"].shape[0]):
            n = int(batch["noise_lengths"][r])
            crop = batch["noise"][r, :n].numpy()
            found = False
            for src in sources:
                looped = np.tile(src, -(-(n + len(src)) // len(src)))  # short files are looped
                hits = np.flatnonzero(looped[: len(src)] == crop[0])
                found = found or any(np.array_equal(looped[h:h + n], crop) for h in hits)
            assert found, "noise crop is not a (looped) window of any noise file"


def test_corrupt_file_is_skipped_counted_and_reported(corpus, tmp_path):
    index, noise, _, _, root = corpus
    bad = index.path(3)
    manifest = tmp_path / "m.json"
    items = [{"audio_filepath": index.path(i), "duration": float(index.durations[i])} for i in range(len(index))]
    garbage = tmp_path / "broken.wav"
    garbage.write_bytes(b"RIFF....WAVEfmt " + bytes(range(200)))
    items[3]["audio_filepath"] = str(garbage)
    manifest.write_text("".join(json.dumps(it) + "\n" for it in items))
    idx = load_manifest(manifest)
    loader = build_loader(idx, None, batch_seconds=3.0, seed=0)
    seen, skipped = [], []
    for batch in loader:
        seen += batch["indices"].tolist()
        skipped += batch["skipped"]
        assert batch["audio"].shape[0] == len(batch["indices"])
    assert sorted(seen) == [i for i in range(len(idx)) if i != 3]  # the rest of its batch survived
    assert len(skipped) == 1 and skipped[0][0] == str(garbage) and skipped[0][1]
    assert loader.num_skipped == 1 and loader.state_dict()["num_skipped"] == 1
    assert bad != str(garbage)
    strict = build_loader(idx, None, batch_seconds=3.0, seed=0, strict=True)
    with pytest.raises(AudioReadError, match="broken.wav"):
        for _ in strict:
            pass


def test_batch_of_only_unreadable_files_is_empty_not_dropped(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"not audio at all")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"audio_filepath": "x.wav", "duration": 1.0}) + "\n")
    batches = list(build_loader(load_manifest(manifest), None, batch_seconds=2.0))
    assert len(batches) == 1
    assert batches[0]["audio"].shape == (0, 0) and batches[0]["audio_lengths"].shape == (0,)
    assert len(batches[0]["skipped"]) == 1


def test_two_ranks_cover_the_epoch_once_with_equal_batch_counts(corpus):
    index, _, _, _, _ = corpus
    per_rank = [list(build_loader(index, None, batch_seconds=2.5, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    ids = sorted(i for r in per_rank for b in r for i in b["indices"].tolist())
    assert ids == list(range(len(index)))


def test_resume_counts_consumed_batches_not_prefetched_ones(corpus):
    """With 2 workers prefetching ahead, a state saved after k batches resumes at batch k."""
    index, noise, _, _, _ = corpus
    kw = dict(batch_seconds=2.0, seed=7)
    ref_loader = build_loader(index, noise, **kw)
    ref = list(ref_loader) + list(ref_loader)  # two epochs, no workers
    n_epoch = len(ref) // 2

    loader = build_loader(index, noise, num_workers=2, **kw)
    stop = n_epoch - 2  # mid-epoch; the workers have prefetched past it
    got = take(loader, stop)
    state = loader.state_dict()
    assert state["position"] == stop and state["epoch"] == 0
    del loader  # the interrupted run goes away

    resumed = build_loader(index, noise, num_workers=2, **kw)
    resumed.load_state_dict(state)
    got += list(resumed)        # rest of epoch 0
    assert resumed.epoch == 1
    got += list(resumed)        # epoch 1
    same_batches(got, ref)


def test_loader_rows_equal_load_audio_with_offsets(tmp_path):
    x = (np.arange(SR, dtype=np.int64) % 2000 - 1000).astype(np.int16)
    from data_fixtures import write_manifest, write_wav
    write_wav(tmp_path / "long.wav", x)
    m = write_manifest(tmp_path / "m.json", [{"audio_filepath": "long.wav", "duration": 0.25, "offset": o}
                                            for o in (0.0, 0.25, 0.5)])
    idx = load_manifest(m)
    for batch in build_loader(idx, None, batch_seconds=1.0, shuffle=False):
        for r, i in enumerate(batch["indices"].tolist()):
            np.testing.assert_array_equal(batch["audio"][r].numpy(),
                                          load_audio(idx.path(i), idx.offsets[i], idx.durations[i]))
            np.testing.assert_array_equal(batch["audio"][r].numpy(),
                                          x[int(idx.offsets[i] * SR):][:4000] / np.float32(32768))


def test_breaking_out_and_iterating_again_continues_at_the_consumed_batch(corpus):
    """Persistent workers keep prefetched batches of the abandoned iterator; none may leak."""
    index, noise, _, _, _ = corpus
    ref = list(build_loader(index, noise, batch_seconds=2.0, seed=2))
    loader = build_loader(index, noise, batch_seconds=2.0, seed=2, num_workers=2)
    got = take(loader, 2)
    got += take(loader, 1)
    got += list(loader)
    same_batches(got, ref)


def test_noise_cache_gives_the_same_crops_as_reading_each_crop(corpus):
    """16 kHz PCM noise: a cached whole-file decode sliced equals a seek-and-read of the crop."""
    index, noise, _, _, _ = corpus
    cached = list(build_loader(index, noise, batch_seconds=3.0, seed=1))
    direct = list(build_loader(index, noise, batch_seconds=3.0, seed=1, noise_cache_mb=0))
    assert cached[0]["noise"].abs().sum() > 0
    same_batches(cached, direct)
