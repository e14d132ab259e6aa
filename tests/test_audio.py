import numpy as np
import pytest
import soundfile as sf

from data_fixtures import write_wav
from streamssl.data.audio import AudioReadError, audio_info, load_audio


@pytest.fixture
def pcm(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(-20000, 20000, size=16000, dtype=np.int16)
    return write_wav(tmp_path / "x.wav", x), x


@pytest.mark.parametrize("subtype,scale", [("PCM_16", 2.0 ** 15), ("PCM_24", 2.0 ** 23), ("PCM_32", 2.0 ** 31)])
def test_integer_formats_scale_to_unit_range(tmp_path, subtype, scale):
    rng = np.random.default_rng(1)
    bits = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32}[subtype]
    ints = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=4000).astype(np.int64)
    # soundfile writes int32 data left-aligned; shift so the file holds `ints` exactly.
    path = write_wav(tmp_path / "x.wav", (ints << (32 - bits)).astype(np.int32), subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.shape == (4000,)
    # libsndfile divides by 2**(bits-1); the float32 result is that quotient rounded once.
    np.testing.assert_array_equal(y, (ints / scale).astype(np.float32))


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_float_formats(tmp_path, subtype):
    x = np.random.default_rng(2).uniform(-1, 1, 3000)
    y = load_audio(write_wav(tmp_path / "x.wav", x, subtype=subtype))
    np.testing.assert_array_equal(y, x.astype(np.float32))  # one rounding to float32 either way


def test_segment_equals_slice_of_whole_file_and_reads_only_the_segment(pcm, monkeypatch):
    path, x = pcm
    whole = load_audio(path)
    requested = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *a, **k):
        requested.append(frames)
        return real_read(self, frames, *a, **k)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    seg = load_audio(path, offset=0.25, duration=0.125)
    assert requested == [2000]  # one read of exactly the segment, after a seek
    np.testing.assert_array_equal(seg, whole[4000:6000])
    np.testing.assert_array_equal(whole, x / np.float32(32768))


def test_segment_past_the_end_is_truncated(pcm):
    path, _ = pcm
    assert load_audio(path, offset=0.9, duration=0.5).shape == (1600,)


def test_stereo_is_mixed_down_to_the_channel_mean(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.5, 0.5, (2000, 2)).astype(np.float32)
    y = load_audio(write_wav(tmp_path / "s.wav", x, subtype="FLOAT"))
    np.testing.assert_array_equal(y, x.mean(axis=1, dtype=np.float32))


@pytest.mark.parametrize("file_sr", [8000, 44100, 48000])
def test_other_rates_are_resampled_with_soxr(tmp_path, file_sr):
    dur, f0 = 1.0, 440.0
    t = np.arange(int(dur * file_sr)) / file_sr
    path = write_wav(tmp_path / "r.wav", 0.5 * np.sin(2 * np.pi * f0 * t), sr=file_sr, subtype="FLOAT")
    assert audio_info(path) == (file_sr, int(dur * file_sr), 1)
    y = load_audio(path, sample_rate=16000)
    assert y.shape == (16000,)
    ref = 0.5 * np.sin(2 * np.pi * f0 * np.arange(16000) / 16000)
    # Away from the edges (the resampler's filter sees zeros past them), soxr "HQ" is accurate
    # to far better than 1e-3 of full scale for an in-band tone; a wrong rate would be off by O(1).
    mid = slice(800, 15200)
    assert np.abs(y[mid] - ref[mid]).max() < 1e-3


def test_corrupt_and_missing_files_raise_with_path_and_reason(tmp_path, pcm):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    with pytest.raises(AudioReadError) as e:
        load_audio(garbage)
    assert e.value.path == str(garbage) and e.value.reason
    with pytest.raises(AudioReadError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    nan = write_wav(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], np.float32), subtype="FLOAT")
    with pytest.raises(AudioReadError, match="non-finite"):
        load_audio(nan)
    with pytest.raises(AudioReadError, match="past the end"):
        load_audio(pcm[0], offset=2.0)


def test_truncated_file_raises(tmp_path, pcm):
    data = open(pcm[0], "rb").read()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:30])  # header cut inside the fmt chunk
    with pytest.raises(AudioReadError):
        load_audio(cut)


def test_bad_arguments(pcm):
    with pytest.raises(ValueError, match="offset"):
        load_audio(pcm[0], offset=-1.0)
    with pytest.raises(ValueError, match="duration"):
        load_audio(pcm[0], duration=0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(pcm[0], sample_rate=0)


def test_decoding_into_a_caller_buffer(tmp_path, pcm):
    path, x = pcm
    ref = load_audio(path, offset=0.5, duration=0.25)
    row = np.full(5000, 7.0, np.float32)
    got = load_audio(path, offset=0.5, duration=0.25, out=row)
    assert np.shares_memory(got, row) and got.shape == (4000,)
    np.testing.assert_array_equal(got, ref)
    assert (row[4000:] == 7.0).all()  # nothing written past the segment
    # Stereo and resampled files take the general path and are copied into the buffer.
    st = write_wav(tmp_path / "st.wav", np.random.default_rng(0).uniform(-0.5, 0.5, (3000, 2)), subtype="FLOAT")
    rs = write_wav(tmp_path / "rs.wav", np.random.default_rng(1).uniform(-0.5, 0.5, 4410), sr=44100, subtype="FLOAT")
    for p, dur in ((st, None), (rs, 0.1)):
        buf = np.zeros(3200, np.float32)
        got = load_audio(p, duration=dur, out=buf)
        assert np.shares_memory(got, buf)
        np.testing.assert_array_equal(got, load_audio(p, duration=dur))
    assert load_audio(rs, duration=0.1).shape == (1600,)  # round(duration * sample_rate) exactly
    with pytest.raises(ValueError, match="out"):
        load_audio(path, duration=0.25, out=np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="out"):
        load_audio(path, duration=0.25, out=np.zeros(5000, np.float64))
