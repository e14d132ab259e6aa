"""Reading audio segments: soundfile for I/O, mono mixdown, soxr for resampling."""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import soxr

__all__ = ["AudioReadError", "load_audio", "audio_info"]


class AudioReadError(RuntimeError):
    """An audio file could not be read or is corrupt. ``path`` and ``reason`` are attributes."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(sample_rate, num_frames, channels)`` of a file, from its header only."""
    path = os.fspath(path)
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or OSError
        raise AudioReadError(path, _reason(e)) from None
    return int(info.samplerate), int(info.frames), int(info.channels)


def _reason(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg.splitlines()[0]


def load_audio(path: str | os.PathLike, offset: float = 0.0, duration: float | None = None,
               sample_rate: int = 16000, *, out: np.ndarray | None = None, name: str | None = None) -> np.ndarray:
    """Read ``duration`` seconds starting at ``offset`` seconds as mono float32 at ``sample_rate``.

    Only the requested segment is decoded (the file is seeked, not read whole). Integer formats
    are scaled to [-1, 1) by libsndfile; several channels are averaged; a file whose rate
    differs from ``sample_rate`` is resampled with soxr (``"HQ"`` quality). With a duration, the
    result has ``round(duration * sample_rate)`` samples, fewer only when the file ends first.

    Args:
        out: optional (m,) float32 C-contiguous array to decode into (a batch row): the samples
            go to ``out[:n]`` and that view is returned, saving a copy. ValueError if m < n.
        name: how errors name the audio; needed when ``path`` is a file object (e.g. a tar
            member's bytes in ``io.BytesIO``), which is read like a file.

    Returns:
        (n,) float32 numpy array, n >= 1.

    Raises:
        ValueError: ``offset < 0``, ``duration <= 0``, ``sample_rate <= 0`` or a bad ``out``.
        AudioReadError: missing/unreadable/corrupt file, offset past the end, an empty segment
            or non-finite samples (a NaN in a float WAV would poison training silently).
    """
    src = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    path = name if name is not None else (src if isinstance(src, str) else repr(src))
    if not (offset >= 0.0):
        raise ValueError(f"offset must be >= 0, got {offset}")
    if duration is not None and not (duration > 0.0):
        raise ValueError(f"duration must be > 0 or None, got {duration}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if out is not None and (out.ndim != 1 or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"out: expected a 1-D C-contiguous float32 array, got {out.dtype} {out.shape}")
    try:
        with sf.SoundFile(src) as f:
            file_sr = int(f.samplerate)
            total = int(f.frames)
            start = int(round(offset * file_sr))
            if total > 0 and start >= total:
                raise AudioReadError(path, f"offset {offset:.3f} s is past the end of the file "
                                           f"({total / file_sr:.3f} s)")
            frames = -1 if duration is None else max(1, int(round(duration * file_sr)))
            if start > 0:
                if f.seekable():
                    f.seek(start)
                else:  # rare (e.g. piped formats): decode and drop
                    f.read(start, dtype="float32", always_2d=True)
            # Integer PCM cannot hold NaN/Inf: only decoders that produce floats need the check.
            check_finite = not str(f.subtype).startswith(("PCM_", "ULAW", "ALAW"))
            direct = out is not None and f.channels == 1 and file_sr == sample_rate
            if direct:
                want = frames if frames >= 0 else max(total - start, 0)
                if want > out.shape[0]:
                    raise ValueError(f"out: room for {out.shape[0]} samples, {path} segment has {want}")
                data = f.read(want, dtype="float32", out=out[:want])
            else:
                data = f.read(frames, dtype="float32", always_2d=True)
    except (AudioReadError, ValueError):
        raise
    except Exception as e:
        raise AudioReadError(path, _reason(e)) from None
    if data.shape[0] == 0:
        raise AudioReadError(path, "no samples in the requested segment")
    mono = data if direct else (data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32))
    if check_finite and not np.isfinite(mono).all():
        raise AudioReadError(path, "non-finite samples (NaN or Inf)")
    if direct:
        return mono
    if file_sr != sample_rate:
        mono = soxr.resample(mono, file_sr, sample_rate, quality="HQ")
        if duration is not None:  # the resampler may round up by a sample
            mono = mono[:max(1, int(round(duration * sample_rate)))]
        if mono.shape[0] == 0:
            raise AudioReadError(path, "segment shorter than one sample after resampling")
    if out is not None:
        if mono.shape[0] > out.shape[0]:
            raise ValueError(f"out: room for {out.shape[0]} samples, {path} segment has {mono.shape[0]}")
        out[:mono.shape[0]] = mono
        return out[:mono.shape[0]]
    return np.ascontiguousarray(mono, dtype=np.float32)
