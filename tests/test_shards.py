"""Tar shards in NeMo's tarred layout: writing, streaming, exact resume, rank sharding, corrupt members."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from streamssl.cli import main as cli_main
from streamssl.config import load_config
from streamssl.data.audio import AudioReadError
from streamssl.data.demo import make_demo_corpus
from streamssl.data.manifest import load_manifest
from streamssl.data.shard_loader import assign_shards, build_shard_loader, load_tarred_manifest
from streamssl.data.shards import expand_shard_pattern, write_shards
from streamssl.train import pretrain_trainer as Trainer

from test_pretrain import FAST, _metrics

KEY = "data.train_tarred_audio_filepaths"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), n_train=24, n_val=4, n_noise=2)


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    return write_shards(corpus.train, tmp_path_factory.mktemp("shards"), num_shards=4)


def _loader(shards, **kw):
    kw.setdefault("batch_seconds", 24)
    kw.setdefault("seed", 5)
    return build_shard_loader(load_tarred_manifest(shards.manifest, shards.pattern), **kw)


def test_written_shards_have_nemos_layout(corpus, shards):
    root = Path(shards.manifest).parent
    assert sorted(p.name for p in root.glob("*.tar")) == [f"audio_{i}.tar" for i in range(4)]
    assert shards.pattern == str(root / "audio__OP_0..3_CL_.tar")
    assert expand_shard_pattern(str(root / "audio_{0..3}.tar")) == shards.shards
    lines = [json.loads(x) for x in Path(shards.manifest).read_text().splitlines()]
    source = {Path(json.loads(x)["audio_filepath"]).stem: json.loads(x)
              for x in Path(corpus.train).read_text().splitlines()}
    assert len(lines) == 24
    for s in range(4):
        with tarfile.open(root / f"audio_{s}.tar") as tar:
            names = tar.getnames()
        mine = [x for x in lines if x["shard_id"] == s]
        assert names == [x["audio_filepath"] for x in mine]  # manifest order = member order
        for x in mine:
            src = source[Path(x["audio_filepath"]).stem]
            assert x["text"] == src["text"] and x["duration"] == pytest.approx(src["duration"], abs=1e-4)
    # Duration-balanced: shards differ by less than the longest utterance.
    assert max(shards.seconds) - min(shards.seconds) < max(x["duration"] for x in lines)


def test_shard_cli(corpus, tmp_path, capsys):
    assert cli_main(["shard", corpus.train, str(tmp_path / "out"), "--target-mb", "0.5", "--format", "wav"]) == 0
    out = capsys.readouterr().out
    assert "data.train_tarred_audio_filepaths=" in out
    with tarfile.open(tmp_path / "out" / "audio_0.tar") as tar:
        assert tar.getnames()[0].endswith(".wav")
    assert len(list((tmp_path / "out").glob("audio_*.tar"))) >= 2


def test_one_epoch_reads_every_member_once_and_matches_the_files(corpus, shards):
    loader = _loader(shards, noise_index=load_manifest(corpus.noise))
    tindex = loader.dataset.tindex
    seen = []
    for b in loader:
        assert b["noise"].shape == b["audio"].shape and b["skipped"] == []
        assert float(b["audio"].abs().sum()) > 0
        for r, i in enumerate(b["indices"].tolist()):
            n = int(b["audio_lengths"][r])
            assert n == round(tindex.index.durations[i] * 16000)
        seen += b["indices"].tolist()
    assert sorted(seen) == list(range(24))
    assert loader.epoch == 1 and loader.position == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_mid_epoch(shards, workers):
    def run(loader):
        return [(b["indices"].tolist(), float(b["audio"].sum())) for b in loader]

    full = run(_loader(shards, num_workers=workers, shuffle_buffer=5))
    for k in (1, len(full) // 2, len(full) - 1):
        first = _loader(shards, num_workers=workers, shuffle_buffer=5)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        del it
        assert state["position"] == k and len(state["streams"]) == max(workers, 1)
        for st in state["streams"]:  # shard order, shard index, member offset per worker
            assert set(st) == {"shards", "shard_index", "member_offset"}
        again = _loader(shards, num_workers=workers, shuffle_buffer=5)
        again.load_state_dict(state)
        assert run(again) == full[k:], k
    other = _loader(shards, num_workers=workers, shuffle_buffer=5, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_two_ranks_read_disjoint_shards(shards):
    sec = load_tarred_manifest(shards.manifest, shards.pattern).shard_seconds
    for epoch in range(3):
        plan = assign_shards(sec, world_size=2, num_workers=2, seed=1, epoch=epoch)
        flat = [s for rank in plan for worker in rank for s in worker]
        assert sorted(flat) == [0, 1, 2, 3]  # each shard read by exactly one (rank, worker)
        assert [len([s for w in rank for s in w]) for rank in plan] == [2, 2]
    with pytest.raises(ValueError, match=KEY):
        assign_shards(sec, world_size=5)
    # Through the loaders: disjoint utterances, all of them, the same number of batches per rank.
    loaders = [_loader(shards, rank=r, world_size=2) for r in range(2)]
    got = [[i for b in loader for i in b["indices"].tolist()] for loader in loaders]
    assert len(loaders[0]) == len(loaders[1])
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(24))
    tindex = loaders[0].dataset.tindex
    shards_of = [set(tindex.shard_ids[g].tolist()) for g in got]
    assert not shards_of[0] & shards_of[1]


def _corrupt_member(shards, tmp_path) -> tuple[str, str, str]:
    """A copy of the shard set whose shard 1 has one member's bytes replaced by garbage."""
    out = tmp_path / "bad"
    out.mkdir()
    for s, path in enumerate(shards.shards):
        with tarfile.open(path) as src, tarfile.open(out / f"audio_{s}.tar", "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if s == 1 and m.name == src.getnames()[0]:
                    bad = m.name
                    data = (b"garbage!" * len(data))[:len(data)]
                dst.addfile(m, io.BytesIO(data))
    (out / "tarred_audio_manifest.json").write_text(Path(shards.manifest).read_text())
    return str(out / "tarred_audio_manifest.json"), str(out / "audio_{0..3}.tar"), bad


def test_a_corrupt_member_is_skipped_and_counted(shards, tmp_path):
    manifest, pattern, bad = _corrupt_member(shards, tmp_path)
    loader = build_shard_loader(load_tarred_manifest(manifest, pattern), batch_seconds=24, seed=5)
    seen, skipped = [], []
    for b in loader:
        seen += b["indices"].tolist()
        skipped += b["skipped"]
    assert len(seen) == 23 and loader.num_skipped == 1
    assert skipped[0][0].endswith(f"audio_1.tar:{bad}")
    strict = build_shard_loader(load_tarred_manifest(manifest, pattern), batch_seconds=24, seed=5, strict=True)
    with pytest.raises(AudioReadError, match=bad):
        for _ in strict:
            pass


def test_a_truncated_shard_skips_its_missing_members(shards, tmp_path):
    out = tmp_path / "trunc"
    out.mkdir()
    for s, path in enumerate(shards.shards):
        data = Path(path).read_bytes()
        (out / f"audio_{s}.tar").write_bytes(data[:len(data) // 2] if s == 2 else data)
    (out / "m.json").write_text(Path(shards.manifest).read_text())
    loader = build_shard_loader(load_tarred_manifest(str(out / "m.json"), str(out / "audio__OP_0..3_CL_.tar")),
                                batch_seconds=24, seed=5)
    n = sum(b["audio"].shape[0] for b in loader)
    n_in_shard_2 = sum(1 for x in Path(shards.manifest).read_text().splitlines() if json.loads(x)["shard_id"] == 2)
    assert 0 < loader.num_skipped <= n_in_shard_2 and n + loader.num_skipped == 24


@pytest.mark.parametrize("pattern, match", [
    ("audio__OP_0..3.tar", "unbalanced"),
    ("audio__OP_3..0_CL_.tar", "empty range"),
    ("audio__OP_0..9_CL_.tar", "not found"),
])
def test_a_bad_pattern_names_the_key(shards, pattern, match, tmp_path):
    full = str(Path(shards.manifest).parent / pattern)
    with pytest.raises(ValueError, match=f"{KEY}.*{match}"):
        load_tarred_manifest(shards.manifest, full)
    cfg = load_config("demo", FAST + [f"data.train_manifest={shards.manifest}", f"{KEY}={full}"])
    with pytest.raises(ValueError, match=KEY):
        Trainer(cfg, tmp_path / "run")


def test_a_shard_id_beyond_the_pattern_names_the_key(shards):
    two = str(Path(shards.manifest).parent / "audio_{0..1}.tar")
    with pytest.raises(ValueError, match=f"shard_id 2 but {KEY} names 2 shard"):
        load_tarred_manifest(shards.manifest, two)


def test_training_from_shards_resumes_exactly(corpus, shards, tmp_path):
    """A NeMo-layout tarred dataset trains without conversion; a run stopped at step 2 and rerun
    logs exactly the losses of an uninterrupted 4-step run."""
    base = FAST + [f"data.train_manifest={shards.manifest}", f"{KEY}={shards.pattern}",
                   f"data.val_manifest={corpus.val}", f"data.noise_manifest={corpus.noise}",
                   "data.num_workers=1", "data.shuffle_buffer=6", "trainer.ckpt_every=2", "trainer.val_every=1000"]
    full, split = tmp_path / "full", tmp_path / "split"
    Trainer(load_config("demo", base + ["trainer.max_steps=4"]), full).fit()
    Trainer(load_config("demo", base + ["trainer.max_steps=2"]), split).fit()
    Trainer(load_config("demo", base + ["trainer.max_steps=4"]), split).fit()  # resumes at step 2
    a, b = _metrics(full), _metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "acc", "num_targets", "audio_seconds"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    assert all(np.isfinite(r["loss"]) for r in a)


def test_reader_memory_is_bounded_by_the_shuffle_buffer(shards):
    peak = {}
    for buf in (2, 24):
        loader = _loader(shards, shuffle_buffer=buf)
        assert sum(b["audio"].shape[0] for b in loader) == 24
        peak[buf] = loader.dataset.peak_held_bytes
    total = sum(Path(p).stat().st_size for p in shards.shards)
    assert 0 < peak[2] < peak[24] / 3 and peak[2] < total / 4, (peak, total)


def test_global_statistics_come_from_the_shards(corpus, shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("demo", FAST + [f"data.train_manifest={shards.manifest}", f"{KEY}={shards.pattern}",
                                      "model.features.normalize=global", "data.num_workers=0",
                                      "trainer.max_steps=1", "trainer.val_every=1000"])
    Trainer(cfg, out).fit()
    stats = json.loads((out / "feature_stats.json").read_text())
    assert stats["frames"] > 1000 and stats["skipped"] == 0
    assert _metrics(out)[-1]["step"] == 1


# -- Lhotse cut sets (optional) ---------------------------------------------------------------------
def test_lhotse_missing_names_the_key_and_the_extra(corpus, tmp_path, monkeypatch):
    from streamssl.data.lhotse_cuts import load_cuts

    cuts = tmp_path / "cuts.jsonl.gz"
    cuts.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "lhotse", None)
    with pytest.raises(ImportError, match=r"data.train_cuts.*streamssl\[lhotse\]"):
        load_cuts(cuts)
    with pytest.raises(ValueError, match="data.train_cuts.*Shar"):
        load_cuts(tmp_path)


def test_a_lhotse_cut_set_trains(corpus, tmp_path):
    lhotse = pytest.importorskip("lhotse", reason="the optional lhotse package is not installed "
                                                  "(pip install 'streamssl[lhotse]')")
    from streamssl.data.lhotse_cuts import load_cuts

    lines = [json.loads(x) for x in Path(corpus.train).read_text().splitlines()]
    root = Path(corpus.train).parent
    recs = [lhotse.Recording.from_file(root / x["audio_filepath"], recording_id=f"r{i}") for i, x in enumerate(lines)]
    sups = [lhotse.SupervisionSegment(id=f"s{i}", recording_id=f"r{i}", start=0.0, duration=r.duration,
                                      text=x["text"]) for i, (r, x) in enumerate(zip(recs, lines))]
    cutset = lhotse.CutSet.from_manifests(recordings=lhotse.RecordingSet.from_recordings(recs),
                                          supervisions=lhotse.SupervisionSet.from_segments(sups))
    path = tmp_path / "cuts.jsonl.gz"
    cutset.to_file(path)
    index = load_cuts(path, keep_text=True)
    assert len(index) == 24 and index.text(0) == lines[0]["text"]
    assert index.durations.tolist() == pytest.approx([x["duration"] for x in lines])
    out = tmp_path / "run"
    Trainer(load_config("demo", FAST + [f"data.train_cuts={path}", f"data.val_manifest={corpus.val}",
                                        "data.num_workers=0", "trainer.max_steps=2", "trainer.val_every=1000"]),
            out).fit()
    assert _metrics(out)[-1]["step"] == 2


@pytest.mark.parametrize("offset, duration", [(0.0, 3.0), (0.5, 1.2), (2.9, 1.0)])
def test_wav_members_decode_as_libsndfile_does(offset, duration):
    import soundfile as sf

    from streamssl.data.audio import load_audio
    from streamssl.data.shard_loader import _pcm16_wav

    y = (np.random.default_rng(0).standard_normal(48000) * 0.3).clip(-1, 1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, y, 16000, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    fast = _pcm16_wav(data, offset, duration, 16000, np.zeros(60000, np.float32))
    ref = load_audio(io.BytesIO(data), offset, duration, 16000, out=np.zeros(60000, np.float32))
    assert fast is not None and np.array_equal(fast, ref)
    assert _pcm16_wav(data, offset, duration, 8000, np.zeros(60000, np.float32)) is None  # other rate: libsndfile


def test_wav_and_flac_shards_give_the_same_batches(corpus, shards, tmp_path):
    wav = write_shards(corpus.train, tmp_path / "wav", num_shards=4, fmt="wav")
    a = [(b["indices"].tolist(), b["audio"]) for b in _loader(shards)]
    b = [(b["indices"].tolist(), b["audio"]) for b in _loader(wav)]
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(np.array_equal(x[1].numpy(), y[1].numpy()) for x, y in zip(a, b))


def test_two_process_ddp_from_shards_resumes_exactly(corpus, shards, tmp_path):
    """torchrun with 2 gloo processes reading disjoint shards: replicas stay identical (checked at
    every checkpoint) and a run stopped at step 2 and rerun logs the uninterrupted run's losses."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = [*FAST, f"data.train_manifest={shards.manifest}", f"{KEY}={shards.pattern}", "data.num_workers=1",
            "data.shuffle_buffer=4", f"data.noise_manifest={corpus.noise}", "trainer.ckpt_every=1",
            "trainer.val_every=1000"]

    def run(out, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "streamssl.cli", "pretrain", "--out", str(out), *args, f"trainer.max_steps={steps}"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr

    run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4)
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "acc", "num_targets", "audio_seconds"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_webdataset_shards_are_indexed_and_read(corpus, tmp_path, capsys):
    """WebDataset-style shards (KEY.wav + KEY.json per utterance) train after one indexing pass."""
    lines = [json.loads(x) for x in Path(corpus.train).read_text().splitlines()]
    root = Path(corpus.train).parent
    wds = tmp_path / "wds"
    wds.mkdir()
    for s in range(3):
        with tarfile.open(wds / f"shard-{s:03d}.tar", "w") as tar:
            for i, x in enumerate(lines[s::3]):
                key = f"utt{s}_{i:03d}"
                for name, data in ((f"{key}.wav", (root / x["audio_filepath"]).read_bytes()),
                                   (f"{key}.json", json.dumps({"text": x["text"]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pattern = str(wds / "shard-{000..002}.tar")
    assert cli_main(["shard", "--webdataset", pattern, str(tmp_path / "idx")]) == 0
    assert f"data.train_tarred_audio_filepaths={pattern}" in capsys.readouterr().out
    manifest = tmp_path / "idx" / "tarred_audio_manifest.json"
    got = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(got) == 24 and {x["shard_id"] for x in got} == {0, 1, 2}
    assert sorted(x["text"] for x in got) == sorted(x["text"] for x in lines)
    assert sorted(round(x["duration"], 4) for x in got) == sorted(round(x["duration"], 4) for x in lines)
    loader = build_shard_loader(load_tarred_manifest(str(manifest), pattern), batch_seconds=24, seed=1)
    assert sum(b["audio"].shape[0] for b in loader) == 24 and loader.num_skipped == 0


def _write_shar_by_hand(corpus, out: Path) -> list[dict]:
    """The layout lhotse's CutSet.to_shar(fields={"recording": "wav"}) writes, without lhotse."""
    import gzip

    lines = [json.loads(x) for x in Path(corpus.train).read_text().splitlines()]
    root = Path(corpus.train).parent
    out.mkdir()
    for s in range(2):
        part = lines[s * 12:(s + 1) * 12]
        with gzip.open(out / f"cuts.{s:06d}.jsonl.gz", "wt") as f, tarfile.open(out / f"recording.{s:06d}.tar", "w") as tar:
            for i, x in enumerate(part):
                cid = f"c{s}-{i}"
                f.write(json.dumps({"id": cid, "start": 0, "duration": x["duration"], "channel": 0, "type": "MonoCut",
                                    "supervisions": [{"id": cid, "start": 0, "duration": x["duration"],
                                                      "text": x["text"]}]}) + "\n")
                for name, data in ((f"{cid}.wav", (root / x["audio_filepath"]).read_bytes()),
                                   (f"{cid}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return lines


def test_a_lhotse_shar_directory_streams_and_trains(corpus, tmp_path):
    from streamssl.data.lhotse_cuts import load_shar

    lines = _write_shar_by_hand(corpus, tmp_path / "shar")
    tindex = load_shar(tmp_path / "shar")
    assert len(tindex) == 24 and len(tindex.shards) == 2
    assert sorted(tindex.index.durations.tolist()) == pytest.approx(sorted(x["duration"] for x in lines))
    loader = build_shard_loader(tindex, batch_seconds=24, seed=2)
    assert sum(b["audio"].shape[0] for b in loader) == 24 and loader.num_skipped == 0
    with pytest.raises(ValueError, match="data.train_cuts.*not a Lhotse Shar"):
        load_shar(tmp_path)
    out = tmp_path / "run"
    Trainer(load_config("demo", FAST + [f"data.train_cuts={tmp_path / 'shar'}", f"data.val_manifest={corpus.val}",
                                        "data.num_workers=0", "trainer.max_steps=2", "trainer.val_every=1000"]),
            out).fit()
    assert _metrics(out)[-1]["step"] == 2


def test_lhotse_to_shar_output_is_read(corpus, tmp_path):
    lhotse = pytest.importorskip("lhotse", reason="the optional lhotse package is not installed "
                                                  "(pip install 'streamssl[lhotse]')")
    from streamssl.data.lhotse_cuts import load_shar

    lines = [json.loads(x) for x in Path(corpus.train).read_text().splitlines()]
    root = Path(corpus.train).parent
    recs = [lhotse.Recording.from_file(root / x["audio_filepath"], recording_id=f"r{i}") for i, x in enumerate(lines)]
    cuts = lhotse.CutSet.from_manifests(recordings=lhotse.RecordingSet.from_recordings(recs))
    (tmp_path / "shar").mkdir()
    cuts.to_shar(tmp_path / "shar", fields={"recording": "flac"}, shard_size=10)
    tindex = load_shar(tmp_path / "shar")
    assert len(tindex) == 24 and len(tindex.shards) == 3
    loader = build_shard_loader(tindex, batch_seconds=24, seed=2)
    assert sum(b["audio"].shape[0] for b in loader) == 24 and loader.num_skipped == 0


def test_resume_refuses_what_would_change_the_shard_plan(corpus, shards):
    from streamssl.data.loader import build_loader

    state = _loader(shards, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="num_workers was 1 .* is 2"):
        _loader(shards, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        _loader(shards, shuffle_buffer=7).load_state_dict(state)
    per_file = build_loader(load_manifest(corpus.train), batch_seconds=24).state_dict()
    with pytest.raises(ValueError, match="file by file"):
        _loader(shards).load_state_dict(per_file)
    changed = dict(state, streams=[dict(state["streams"][0], shards=[3, 2, 1, 0])])
    with pytest.raises(ValueError, match="shard order"):
        _loader(shards).load_state_dict(changed)


def test_no_batch_spans_more_than_a_window(shards):
    from streamssl.data.shard_loader import WINDOW_BLOCKS

    for buf in (1, 2):
        plan = _loader(shards, shuffle_buffer=buf).dataset.plan(0)
        for stream in plan.streams:
            spans = [int(b.max()) // buf // WINDOW_BLOCKS - int(b.min()) // buf // WINDOW_BLOCKS for b in stream.batches]
            assert spans and max(spans) == 0  # every batch inside one window of the stream
