"""Causal 80-bin log-mel features computed on the batch's device, and their global statistics.

Definition (``LogMelFeatures``, defaults in brackets), for one utterance x[0..L) at 16 kHz:

1. Dither (training only): ``x += dither * N(0, 1)`` [1e-5].
2. Pre-emphasis, causal, with x[-1] = 0: ``y[n] = x[n] - preemph * x[n-1]`` [0.97].
3. Causal framing: frame t is the ``win_length`` [400 = 25 ms] samples of y ending at sample
   ``(t+1) * hop_length`` [160 = 10 ms], with zeros before y[0]. There are ``T = L // hop`` frames,
   and frame t only depends on samples before ``(t+1) * hop``: features can be computed chunk by
   chunk with a cache of ``win_length - hop_length + 1`` raw samples (``stream_step``).
4. Symmetric Hann window (``torch.hann_window(win, periodic=False)``), zero-padded to ``n_fft``
   [512]; power spectrum ``|rfft|^2`` (n_fft // 2 + 1 = 257 bins).
5. Mel filterbank: ``n_mels`` [80] triangles on the Slaney mel scale (linear below 1 kHz,
   logarithmic above) between fmin [0] and fmax [sr / 2], area-normalised (Slaney norm).
6. ``log(mel + 2**-24)``.
7. Normalisation: ``none`` (streaming encoder input), ``global`` ((x - mean) / std with fixed
   per-bin statistics stored as buffers) or ``per_utterance`` (mean and population std + 1e-5 of
   the valid frames of each utterance; uses the future, so for quantizer targets only).
8. Frames ``t >= L // hop`` are set to 0 and the time axis is zero-padded to a multiple of
   ``pad_to`` [16]; valid frames never depend on padding samples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LogMelFeatures", "mel_filterbank", "hz_to_mel_slaney", "mel_to_hz_slaney",
           "compute_global_stats", "save_stats", "load_stats"]

_NORMALIZE = ("none", "global", "per_utterance")
_PER_UTT_EPS = 1e-5


# Slaney's Auditory Toolbox mel scale: 3 mels per 200 Hz up to 1 kHz, then log-spaced with
# 27 steps per factor 6.4 (so the two pieces meet at 15 mels, 1 kHz).
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel_slaney(f: np.ndarray | float) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    lin = f / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz_slaney(m: np.ndarray | float) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = _F_SP * m
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, lin)


def mel_filterbank(sample_rate: int = 16000, n_fft: int = 512, n_mels: int = 80,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-style triangular mel filters, area-normalised.

    Returns:
        (n_fft // 2 + 1, n_mels) float64; column m rises linearly from edge m to edge m+1 and
        falls to edge m+2 (edges equally spaced in Slaney mels), scaled by ``2 / (f[m+2] - f[m])``.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if not (0.0 <= fmin < fmax <= sample_rate / 2.0):
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, fmax={fmax}")
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"n_mels ({n_mels}) must be >= 1 and n_fft ({n_fft}) >= 2")
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    lo, ce, hi = edges[:-2], edges[1:-1], edges[2:]
    rise = (freqs[:, None] - lo[None, :]) / (ce - lo)[None, :]
    fall = (hi[None, :] - freqs[:, None]) / (hi - ce)[None, :]
    fb = np.maximum(0.0, np.minimum(rise, fall))
    return fb * (2.0 / (hi - lo))[None, :]


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Full float32 matmuls inside, whatever the process chose for the rest of the model.

    ``torch.set_float32_matmul_precision("high"/"medium")`` (common for training speed) turns
    float32 matmuls into TF32 on CUDA and bf16 on oneDNN CPUs: ~1e-3 relative error in the mel
    energies. Features are cheap and feed every target, so they keep IEEE float32.
    """
    saved = []
    try:
        for backend in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul):
            if hasattr(backend, "fp32_precision"):
                saved.append((backend, "fp32_precision", backend.fp32_precision))
                backend.fp32_precision = "ieee"
        if not saved:  # torch < 2.9: only the CUDA switch exists
            saved.append((torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32))
            torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


class LogMelFeatures(nn.Module):
    """Causal log-mel features (definition in the module docstring).

    ``forward(audio (B, N) float32|float64, lengths (B,) int64, generator=None)`` returns
    ``feats (B, T_pad, n_mels)`` in audio's dtype (float32 for float16/bfloat16 input) with
    ``T_pad = ceil((N // hop) / pad_to) * pad_to``, and ``feat_lengths = lengths // hop`` (B,) int64.
    Computed on audio's device, outside autocast.

    Buffers ``mean``/``std`` (n_mels,) hold the global statistics and are saved in the state dict.
    Dither uses ``generator`` when given, else a per-device generator seeded with ``seed``.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, win_length: int = 400,
                 hop_length: int = 160, n_fft: int = 512, preemph: float = 0.97, dither: float = 1e-5,
                 normalize: str = "none", pad_to: int = 16, fmin: float = 0.0,
                 fmax: float | None = None, log_floor: float = 2.0 ** -24, seed: int = 0):
        super().__init__()
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        if not (0 < hop_length <= win_length <= n_fft):
            raise ValueError(f"need 0 < hop_length ({hop_length}) <= win_length ({win_length}) "
                             f"<= n_fft ({n_fft})")
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        if dither < 0 or not (0.0 <= preemph < 1.0) or log_floor <= 0:
            raise ValueError(f"need dither >= 0 (got {dither}), 0 <= preemph < 1 (got {preemph}), "
                             f"log_floor > 0 (got {log_floor})")
        self.sample_rate, self.n_mels = int(sample_rate), int(n_mels)
        self.win_length, self.hop_length, self.n_fft = int(win_length), int(hop_length), int(n_fft)
        self.preemph, self.dither, self.normalize = float(preemph), float(dither), normalize
        self.pad_to, self.fmin = int(pad_to), float(fmin)
        self.fmax = float(sample_rate / 2.0 if fmax is None else fmax)
        self.log_floor, self.seed = float(log_floor), int(seed)
        fb = mel_filterbank(sample_rate, n_fft, n_mels, fmin, self.fmax)
        # Derived from the config, so not saved; kept in float64 and cast per call.
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)
        window = torch.hann_window(win_length, periodic=False, dtype=torch.float64)
        self.register_buffer("window", F.pad(window, (0, n_fft - win_length)), persistent=False)
        self.register_buffer("mean", torch.zeros(n_mels, dtype=torch.float32))
        self.register_buffer("std", torch.ones(n_mels, dtype=torch.float32))
        self._generators: dict[str, torch.Generator] = {}

    # -- configuration ----------------------------------------------------------------------------
    @property
    def cache_samples(self) -> int:
        """Raw samples carried between streaming chunks (before any partial hop)."""
        return self.win_length - self.hop_length + 1

    def config(self) -> dict:
        """The parameters that define the features (stored next to global statistics)."""
        return {"sample_rate": self.sample_rate, "n_mels": self.n_mels, "win_length": self.win_length,
                "hop_length": self.hop_length, "n_fft": self.n_fft, "preemph": self.preemph,
                "fmin": self.fmin, "fmax": self.fmax, "log_floor": self.log_floor}

    def set_stats(self, mean, std) -> None:
        """Set the global statistics ((n_mels,) each, std > 0) used by ``normalize="global"``."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != (self.n_mels,) or std.shape != (self.n_mels,):
            raise ValueError(f"mean/std: expected shape ({self.n_mels},), got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        if not torch.isfinite(mean).all() or not (torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("mean/std: must be finite and std > 0")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def load_stats(self, path: str | os.PathLike) -> None:
        """Load statistics written by :func:`save_stats` / ``streamssl compute-stats``."""
        stats = load_stats(path)
        mine = self.config()
        theirs = stats.get("features", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items()
                if k in theirs and not math.isclose(float(theirs[k]), float(v), rel_tol=1e-9)}
        if diff:
            raise ValueError(f"{path}: statistics were computed with other feature settings "
                             f"(file vs module): {diff}")
        self.set_stats(stats["mean"], stats["std"])

    def rng_state(self) -> dict[str, torch.Tensor]:
        """States of the module's own dither generators, one per device used (for checkpoints)."""
        return {dev: g.get_state() for dev, g in self._generators.items()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`rng_state`, so a resumed run dithers exactly like an uninterrupted one."""
        for dev, st in state.items():
            self._generator(torch.device(dev)).set_state(st)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return g

    # -- computation ------------------------------------------------------------------------------
    def _check(self, audio: torch.Tensor, lengths: torch.Tensor) -> None:
        if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or not audio.is_floating_point():
            raise ValueError(f"audio: expected a (B, N) floating tensor, got "
                             f"{getattr(audio, 'shape', type(audio))} {getattr(audio, 'dtype', '')}")
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (audio.shape[0],) \
                or lengths.dtype != torch.int64 or lengths.device != audio.device:
            raise ValueError(f"lengths: expected ({audio.shape[0]},) int64 on {audio.device}, got "
                             f"{getattr(lengths, 'shape', type(lengths))} {getattr(lengths, 'dtype', '')} "
                             f"on {getattr(lengths, 'device', '?')}")

    def _spectral(self, y: torch.Tensor, n_frames: int) -> torch.Tensor:
        """Log-mel of the first n_frames frames of pre-emphasised, left-context-padded y."""
        # Frames of n_fft samples times a window zero-padded to n_fft: the same FFT input as
        # zero-padding each windowed frame, without rfft's internal pad copy (~2x faster on CPU).
        y = F.pad(y, (0, self.n_fft - self.win_length))
        frames = y.unfold(1, self.n_fft, self.hop_length)[:, :n_frames]  # (B, T, n_fft) view
        spec = torch.fft.rfft(frames * self.window.to(y.dtype))
        power = spec.real.square() + spec.imag.square()
        with _ieee_fp32_matmul():
            mel = torch.matmul(power, self.fb.to(y.dtype))
        return torch.log(mel + self.log_floor)

    def _compute_dtype(self, audio: torch.Tensor) -> torch.dtype:
        return torch.float64 if audio.dtype == torch.float64 else torch.float32

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) audio + (B,) int64 lengths -> (B, T_pad, n_mels) features + (B,) int64 frame counts."""
        self._check(audio, lengths)
        B, N = audio.shape
        hop, ctx = self.hop_length, self.win_length - self.hop_length
        feat_lengths = torch.div(lengths.clamp(0, N), hop, rounding_mode="floor")
        T = N // hop
        T_pad = -(-T // self.pad_to) * self.pad_to
        dtype = self._compute_dtype(audio)
        with torch.autocast(device_type=audio.device.type, enabled=False):
            x = audio.to(dtype)
            if self.training and self.dither > 0:
                g = generator if generator is not None else self._generator(audio.device)
                x = x + self.dither * torch.randn(x.shape, generator=g, device=x.device, dtype=dtype)
            if T == 0:
                return x.new_zeros(B, T_pad, self.n_mels), feat_lengths
            # Zero the padding so nothing in it (not even a NaN) can reach a valid frame through
            # the zero tail of the window.
            x = x.masked_fill(torch.arange(N, device=x.device)[None, :] >= lengths[:, None], 0.0)
            # ctx zeros of left context plus the x[-1] = 0 of the pre-emphasis.
            xp = F.pad(x, (ctx + 1, 0))
            y = xp[:, 1:] - self.preemph * xp[:, :-1]
            feats = self._spectral(y, T)
            valid = torch.arange(T, device=audio.device)[None, :] < feat_lengths[:, None]  # (B, T)
            feats = self._normalize(feats, valid, feat_lengths)
            feats = feats.masked_fill(~valid[:, :, None], 0.0)
            if T_pad != T:
                feats = F.pad(feats, (0, 0, 0, T_pad - T))
        return feats, feat_lengths

    def _normalize(self, feats: torch.Tensor, valid: torch.Tensor, feat_lengths: torch.Tensor) -> torch.Tensor:
        if self.normalize == "global":
            return (feats - self.mean.to(feats.dtype)) / self.std.to(feats.dtype)
        if self.normalize == "per_utterance":
            w = valid[:, :, None].to(feats.dtype)
            n = feat_lengths.clamp(min=1).to(feats.dtype)[:, None, None]
            mean = (feats * w).sum(1, keepdim=True) / n
            var = ((feats - mean).square() * w).sum(1, keepdim=True) / n
            return (feats - mean) / (var.sqrt() + _PER_UTT_EPS)
        return feats

    def init_stream_cache(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Zero cache for :meth:`stream_step`: (batch_size, cache_samples)."""
        return torch.zeros(batch_size, self.cache_samples, device=device, dtype=dtype)

    @torch.no_grad()
    def stream_step(self, chunk: torch.Tensor, cache: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the frames completed by ``chunk`` (B, n), any n >= 0.

        ``cache`` (B, cache_samples + r) holds the raw samples before ``chunk`` (None: start of the
        stream), where r < hop are samples not yet part of an emitted frame. Returns
        ``(feats (B, (r + n) // hop, n_mels), new_cache)``. Concatenating the outputs over a stream
        gives the first ``N // hop`` frames of ``forward`` on the whole audio. Never dithers;
        ``normalize="per_utterance"`` is refused (it needs the whole utterance).
        """
        if self.normalize == "per_utterance":
            raise RuntimeError("stream_step: normalize='per_utterance' needs the whole utterance")
        if chunk.dim() != 2 or not chunk.is_floating_point():
            raise ValueError(f"chunk: expected a (B, n) floating tensor, got {tuple(chunk.shape)} {chunk.dtype}")
        dtype = self._compute_dtype(chunk)
        if cache is None:
            cache = self.init_stream_cache(chunk.shape[0], chunk.device, dtype)
        if cache.dim() != 2 or cache.shape[0] != chunk.shape[0] or cache.shape[1] < self.cache_samples \
                or cache.shape[1] >= self.cache_samples + self.hop_length:
            raise ValueError(f"cache: expected ({chunk.shape[0]}, {self.cache_samples}..{self.cache_samples + self.hop_length - 1}), "
                             f"got {tuple(cache.shape)}")
        with torch.autocast(device_type=chunk.device.type, enabled=False):
            xp = torch.cat([cache.to(dtype), chunk.to(dtype)], dim=1)
            y = xp[:, 1:] - self.preemph * xp[:, :-1]
            n_frames = (xp.shape[1] - self.cache_samples) // self.hop_length
            if n_frames == 0:
                return xp.new_zeros(chunk.shape[0], 0, self.n_mels), xp
            feats = self._spectral(y, n_frames)
            if self.normalize == "global":
                feats = (feats - self.mean.to(dtype)) / self.std.to(dtype)
            return feats, xp[:, n_frames * self.hop_length:].contiguous()


# -- global statistics ------------------------------------------------------------------------------
def save_stats(path: str | os.PathLike, stats: dict) -> None:
    """Write statistics (as returned by :func:`compute_global_stats`) as JSON, atomically."""
    path = os.fspath(path)
    out = {k: (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v) for k, v in stats.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> dict:
    """Read a statistics JSON file; ``mean``/``std`` come back as float32 numpy arrays."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read feature statistics: {e}") from None
    for key in ("mean", "std"):
        if key not in stats:
            raise ValueError(f"{path}: missing key {key!r}")
        stats[key] = np.asarray(stats[key], dtype=np.float32)
    return stats


def compute_global_stats(index, features: LogMelFeatures | None = None, *, max_seconds: float | None = None,
                         batch_seconds: float = 120.0, num_workers: int = 0, seed: int = 0,
                         device: str | torch.device = "cpu", loader=None) -> dict:
    """Per-bin mean and population std of log-mel features over the valid frames of a manifest.

    Args:
        index: a ``ManifestIndex``.
        features: the feature definition (default ``LogMelFeatures()``); run in eval mode
            (no dither) and without normalisation.
        max_seconds: use a seeded random subset of about this much audio (None: everything).
        batch_seconds, num_workers: passed to the loader (unreadable files are skipped, counted).
        loader: read these batches instead (e.g. a shard loader); ``index`` and the subset
            arguments are then unused. It needs ``num_skipped``.
    Returns:
        dict with ``mean``, ``std`` ((n_mels,) float64 numpy), ``frames``, ``seconds``,
        ``skipped`` (count), ``features`` (the feature config, checked again at load time).
    Statistics are merged per batch in float64 with Chan et al.'s parallel update, so a long
    corpus does not lose precision to a running sum of squares.
    """
    from streamssl.data.loader import build_loader  # data depends on nothing in ssl

    feats_mod = LogMelFeatures() if features is None else features
    cfg = feats_mod.config()
    extractor = LogMelFeatures(**cfg, dither=0.0, normalize="none", pad_to=1).to(device).eval()
    if loader is None:
        if max_seconds is not None and max_seconds < index.total_seconds:
            order = np.random.default_rng(seed).permutation(len(index))
            n_keep = int(np.searchsorted(np.cumsum(index.durations[order]), max_seconds)) + 1
            index = index.subset(np.sort(order[:n_keep]))
        batch_seconds = max(batch_seconds, float(index.durations.max()))
        loader = build_loader(index, None, batch_seconds=batch_seconds, seed=seed, shuffle=False,
                              num_workers=num_workers, sample_rate=cfg["sample_rate"])
    count = 0
    mean = np.zeros(cfg["n_mels"])
    m2 = np.zeros(cfg["n_mels"])
    seconds = 0.0
    with torch.no_grad():
        for batch in loader:
            if batch["audio"].shape[0] == 0:
                continue
            audio = batch["audio"].to(device)
            lengths = batch["audio_lengths"].to(device)
            f, fl = extractor(audio, lengths)
            valid = torch.arange(f.shape[1], device=f.device)[None, :] < fl[:, None]
            x = f[valid].double().cpu().numpy()  # (frames, n_mels)
            if x.shape[0] == 0:
                continue
            nb = x.shape[0]
            mb = x.mean(0)
            m2b = ((x - mb) ** 2).sum(0)
            delta = mb - mean
            tot = count + nb
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta ** 2 * (count * nb / tot)
            count = tot
            seconds += float(lengths.sum()) / cfg["sample_rate"]
    if count < 2:
        raise ValueError("compute_global_stats: fewer than 2 feature frames were read")
    # A bin that never varies (e.g. above the band of upsampled narrow-band audio) would divide
    # by zero; the floor keeps normalisation finite.
    std = np.maximum(np.sqrt(m2 / count), 1e-5)
    return {"mean": mean, "std": std, "frames": int(count), "seconds": seconds,
            "skipped": loader.num_skipped, "features": cfg}
