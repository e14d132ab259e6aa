import os

import numpy as np
import pytest

from data_fixtures import write_manifest, write_wav
from streamssl.data.manifest import ManifestError, ManifestIndex, load_manifest


@pytest.fixture
def wavs(tmp_path):
    a = write_wav(tmp_path / "audio" / "a.wav", np.zeros(1600, np.int16))
    b = write_wav(tmp_path / "audio" / "b.wav", np.zeros(3200, np.int16))
    return a, b


def test_relative_paths_resolve_against_the_manifest_not_the_cwd(tmp_path, wavs, monkeypatch):
    os.makedirs(tmp_path / "lists")
    m = write_manifest(tmp_path / "lists" / "m.json", [
        {"audio_filepath": "../audio/a.wav", "duration": 0.1},
        {"audio_filepath": wavs[1], "duration": 0.2, "offset": 0.05, "text": "hi"},
    ])
    monkeypatch.chdir("/")
    idx = load_manifest(m, keep_text=True)
    assert len(idx) == 2 and idx.num_files == 2
    assert idx.path(0) == os.path.abspath(wavs[0])
    assert idx.path(1) == wavs[1]
    np.testing.assert_array_equal(idx.offsets, [0.0, 0.05])
    np.testing.assert_array_equal(idx.durations, [0.1, 0.2])
    assert idx.text(0) == "" and idx.text(1) == "hi"
    assert idx.durations.dtype == np.float64 and idx.path_ids.dtype == np.int32


def test_segments_of_one_file_share_one_path_entry(tmp_path, wavs):
    m = write_manifest(tmp_path / "m.json", [
        {"audio_filepath": "audio/b.wav", "duration": 0.05, "offset": o} for o in (0.0, 0.05, 0.1)])
    idx = load_manifest(m)
    assert idx.num_files == 1
    assert idx.path_ids.tolist() == [0, 0, 0]
    assert idx.total_seconds == pytest.approx(0.15)


BAD_LINES = [
    ('{"audio_filepath": "audio/a.wav", "duration": 0.1', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"duration": 0.1}', "missing key(s) 'audio_filepath'"),
    ('{"audio_filepath": "audio/a.wav"}', "missing key(s) 'duration'"),
    ('{"audio_filepath": "audio/a.wav", "duration": 0}', "'duration' must be a positive"),
    ('{"audio_filepath": "audio/a.wav", "duration": -1.5}', "'duration' must be a positive"),
    ('{"audio_filepath": "audio/a.wav", "duration": NaN}', "'duration' must be a positive"),
    ('{"audio_filepath": "audio/a.wav", "duration": "3"}', "'duration' must be a positive"),
    ('{"audio_filepath": "audio/a.wav", "duration": 1, "offset": -0.1}', "'offset' must be"),
    ('{"audio_filepath": "audio/nope.wav", "duration": 1}', "audio file not found"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_each_bad_line_is_reported_with_file_and_line(tmp_path, wavs, line, message):
    good = {"audio_filepath": "audio/a.wav", "duration": 0.1}
    m = write_manifest(tmp_path / "m.json", [good, good], raw_lines=["", line])
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    # Line 3 is blank (skipped, but counted), so the bad line is line 4.
    assert f"{m}:4:" in str(e.value)
    assert message in str(e.value)


def test_all_bad_lines_of_all_manifests_are_listed_in_one_error(tmp_path, wavs):
    good = {"audio_filepath": "audio/a.wav", "duration": 0.1}
    m1 = write_manifest(tmp_path / "m1.json", [good], raw_lines=['{"duration": 1}', '{"duration": 2}'])
    m2 = write_manifest(tmp_path / "m2.json", [], raw_lines=['{"audio_filepath": "x.wav", "duration": 1}'])
    with pytest.raises(ManifestError) as e:
        load_manifest([m1, m2])
    msg = str(e.value)
    assert "3 bad manifest line(s)" in msg
    assert f"{m1}:2:" in msg and f"{m1}:3:" in msg and f"{m2}:1:" in msg


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match="nope.json"):
        load_manifest(tmp_path / "nope.json")


def test_check_files_false_accepts_missing_audio(tmp_path):
    m = write_manifest(tmp_path / "m.json", [{"audio_filepath": "gone.wav", "duration": 1.0}])
    idx = load_manifest(m, check_files=False)
    assert idx.path(0) == str(tmp_path / "gone.wav")


def test_duration_filters(tmp_path, wavs):
    durs = [0.5, 1.0, 2.0, 4.0, 8.0]
    m = write_manifest(tmp_path / "m.json", [{"audio_filepath": "audio/a.wav", "duration": d} for d in durs])
    idx = load_manifest(m, min_duration=1.0, max_duration=4.0)
    assert idx.durations.tolist() == [1.0, 2.0, 4.0]
    assert idx.num_filtered == 2
    with pytest.raises(ManifestError, match="after the duration filter"):
        load_manifest(m, min_duration=9.0)
    with pytest.raises(ValueError, match="min_duration"):
        load_manifest(m, min_duration=3.0, max_duration=2.0)


def test_several_manifests_with_weights(tmp_path, wavs):
    m1 = write_manifest(tmp_path / "m1.json", [{"audio_filepath": "audio/a.wav", "duration": 0.1}] * 2)
    m2 = write_manifest(tmp_path / "m2.json", [{"audio_filepath": "audio/b.wav", "duration": 0.2}] * 3)
    idx = load_manifest([m1, m2], weights=[1.0, 0.5])
    assert idx.sources.tolist() == [0, 0, 1, 1, 1]
    assert idx.weights.tolist() == [1.0, 0.5]
    assert idx.manifests == [m1, m2]
    with pytest.raises(ValueError, match="weights"):
        load_manifest([m1, m2], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        load_manifest([m1, m2], weights=[1.0, -1.0])


def test_save_load_and_subset_round_trip(tmp_path, wavs):
    m = write_manifest(tmp_path / "m.json", [
        {"audio_filepath": "audio/a.wav", "duration": 0.1, "text": "één"},
        {"audio_filepath": "audio/b.wav", "duration": 0.2, "offset": 0.01, "text": "two"},
        {"audio_filepath": "audio/a.wav", "duration": 0.05, "text": ""},
    ])
    idx = load_manifest(m, keep_text=True)
    idx.save(tmp_path / "idx.npz")
    back = ManifestIndex.load(tmp_path / "idx.npz")
    assert [back.path(i) for i in range(3)] == [idx.path(i) for i in range(3)]
    assert [back.text(i) for i in range(3)] == ["één", "two", ""]
    np.testing.assert_array_equal(back.offsets, idx.offsets)
    sub = idx.subset(np.array([2, 1]))
    assert [sub.path(i) for i in range(2)] == [idx.path(2), idx.path(1)]
    assert [sub.text(i) for i in range(2)] == ["", "two"]
    np.testing.assert_array_equal(sub.durations, [0.05, 0.2])
