"""A small deterministic speech-like corpus for demos and tests (numpy + soundfile only).

Audio is made by a source-filter synthesiser: a glottal pulse train following a pitch contour and
a white-noise source are shaped, frame by frame, by spectral envelopes (a cascade of formant
resonances for voiced sounds, band-pass shapes for frication) and overlap-added. Each of the 30
phones has fixed acoustic targets, scaled per speaker (vocal-tract length, pitch), with formant
transitions interpolated between neighbouring phones, so phones have consistent and learnable
spectra. Utterances are syllable sequences ((C)(C)V(C)) drawn from a skewed phone distribution,
2 to 12 s long, with silence at both ends.

Output layout under ``out_dir``::

    train.json, val.json, noise.json               NeMo manifests (paths relative to the manifest)
    train_alignment.json, val_alignment.json       per utterance: phones with start/end seconds
    train/*.wav, val/*.wav, noise/*.wav            16 kHz, 16-bit PCM

Bytes are a function of ``seed`` and the counts (with the same numpy version and machine
arithmetic; each utterance has its own generator, so adding utterances leaves others unchanged).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

__all__ = ["DemoCorpus", "make_demo_corpus", "PHONES", "synthesize_utterance"]

SAMPLE_RATE = 16000
_NFFT, _HOP = 512, 128
_FREQS = np.fft.rfftfreq(_NFFT, 1.0 / SAMPLE_RATE)  # (257,)
_WINDOW = np.hanning(_NFFT + 1)[:-1]                 # periodic Hann: exact OLA with hop n/4
_OLA_GAIN = float((_WINDOW ** 2).sum() / _HOP)        # sum of squared windows per sample


@dataclass(frozen=True)
class _Phone:
    name: str
    kind: str                 # vowel, nasal, approx, fric, vfric, stop, vstop
    formants: tuple = ()      # F1..F4 targets (Hz) for phones that anchor formant tracks
    voice: float = 0.0        # voiced amplitude
    noise: float = 0.0        # frication amplitude
    band: tuple = (0.0, 1.0)  # frication band: centre Hz, width Hz
    dur: tuple = (0.06, 0.12)  # duration range (s)


_V, _N, _A = "vowel", "nasal", "approx"
PHONES: tuple[_Phone, ...] = (
    _Phone("a", _V, (730, 1090, 2440, 3400), 1.0, dur=(0.09, 0.18)),
    _Phone("i", _V, (270, 2290, 3010, 3700), 0.9, dur=(0.08, 0.16)),
    _Phone("u", _V, (300, 870, 2240, 3300), 0.9, dur=(0.08, 0.16)),
    _Phone("e", _V, (530, 1840, 2480, 3500), 1.0, dur=(0.08, 0.16)),
    _Phone("o", _V, (570, 840, 2410, 3300), 1.0, dur=(0.09, 0.17)),
    _Phone("ae", _V, (660, 1720, 2410, 3400), 1.0, dur=(0.09, 0.18)),
    _Phone("er", _V, (490, 1350, 1690, 3300), 0.9, dur=(0.09, 0.16)),
    _Phone("uh", _V, (520, 1190, 2390, 3400), 0.9, dur=(0.06, 0.12)),
    _Phone("m", _N, (280, 1000, 2200, 3300), 0.35, dur=(0.05, 0.09)),
    _Phone("n", _N, (280, 1600, 2500, 3300), 0.35, dur=(0.05, 0.09)),
    _Phone("ng", _N, (280, 2000, 2700, 3400), 0.3, dur=(0.05, 0.09)),
    _Phone("l", _A, (360, 1300, 2700, 3400), 0.6, dur=(0.05, 0.09)),
    _Phone("r", _A, (420, 1300, 1600, 3300), 0.6, dur=(0.05, 0.09)),
    _Phone("w", _A, (300, 700, 2200, 3300), 0.55, dur=(0.05, 0.08)),
    _Phone("y", _A, (270, 2100, 3000, 3600), 0.55, dur=(0.05, 0.08)),
    _Phone("s", "fric", noise=0.55, band=(6200, 1400), dur=(0.09, 0.15)),
    _Phone("sh", "fric", noise=0.6, band=(3200, 900), dur=(0.09, 0.15)),
    _Phone("f", "fric", noise=0.18, band=(4500, 3500), dur=(0.08, 0.13)),
    _Phone("th", "fric", noise=0.14, band=(5500, 2500), dur=(0.07, 0.12)),
    _Phone("h", "fric", noise=0.3, band=(0, 0), dur=(0.05, 0.09)),      # aspiration: formant-shaped
    _Phone("z", "vfric", noise=0.35, voice=0.25, band=(6200, 1400), dur=(0.08, 0.13)),
    _Phone("v", "vfric", noise=0.12, voice=0.3, band=(4500, 3500), dur=(0.06, 0.10)),
    _Phone("zh", "vfric", noise=0.4, voice=0.25, band=(3200, 900), dur=(0.07, 0.11)),
    _Phone("p", "stop", noise=0.7, band=(900, 700), dur=(0.09, 0.14)),
    _Phone("t", "stop", noise=0.8, band=(4800, 1800), dur=(0.09, 0.14)),
    _Phone("k", "stop", noise=0.8, band=(2200, 700), dur=(0.09, 0.14)),
    _Phone("b", "vstop", noise=0.4, voice=0.12, band=(900, 700), dur=(0.07, 0.11)),
    _Phone("d", "vstop", noise=0.45, voice=0.12, band=(4000, 1800), dur=(0.07, 0.11)),
    _Phone("g", "vstop", noise=0.45, voice=0.12, band=(2000, 700), dur=(0.07, 0.11)),
    _Phone("ch", "stop", noise=0.6, band=(3400, 1000), dur=(0.10, 0.15)),
)
_BY_NAME = {p.name: p for p in PHONES}
_VOWELS = [p.name for p in PHONES if p.kind == _V]
_CONS = [p.name for p in PHONES if p.kind != _V]
# A skewed (Zipf-like) phone distribution, as in real languages.
_V_P = 1.0 / np.arange(1, len(_VOWELS) + 1) ** 0.7
_V_P /= _V_P.sum()
_C_P = 1.0 / np.arange(1, len(_CONS) + 1) ** 0.6
_C_P /= _C_P.sum()
_SCHWA = (500, 1500, 2500, 3500)
_BANDWIDTHS = np.array([80.0, 100.0, 150.0, 200.0])


@dataclass(frozen=True)
class DemoCorpus:
    """Paths written by :func:`make_demo_corpus` (all absolute)."""
    root: str
    train: str
    val: str
    noise: str
    train_alignment: str
    val_alignment: str


# -- synthesis -------------------------------------------------------------------------------------
def _formant_envelope(formants: np.ndarray) -> np.ndarray:
    """(F, 4) formant frequencies -> (F, 257) magnitude of a cascade of unit-DC-gain resonators."""
    f = _FREQS[None, None, :]
    fc = formants[:, :, None]
    hb = (_BANDWIDTHS / 2.0)[None, :, None]
    h = (fc ** 2 + hb ** 2) / np.sqrt(((f - fc) ** 2 + hb ** 2) * ((f + fc) ** 2 + hb ** 2))
    env = h.prod(axis=1)
    return env / np.sqrt((env ** 2).mean(axis=1, keepdims=True))


def _band_envelope(centre: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(F,) centre and width -> (F, 257) Gaussian band-pass, unit RMS over frequency."""
    width = np.maximum(width, 1.0)
    env = np.exp(-0.5 * ((_FREQS[None, :] - centre[:, None]) / width[:, None]) ** 2) + 1e-3
    return env / np.sqrt((env ** 2).mean(axis=1, keepdims=True))


def _stft(x: np.ndarray, n_frames: int) -> np.ndarray:
    """Frames centred on m * hop for m < n_frames -> (n_frames, 257) complex."""
    pad = np.zeros(n_frames * _HOP + _NFFT, dtype=np.float64)
    seg = x[: n_frames * _HOP + _NFFT // 2]
    pad[_NFFT // 2: _NFFT // 2 + seg.shape[0]] = seg
    frames = np.lib.stride_tricks.sliding_window_view(pad, _NFFT)[::_HOP][:n_frames]
    return np.fft.rfft(frames * _WINDOW, axis=1)


def _istft(spec: np.ndarray, n: int) -> np.ndarray:
    """Weighted overlap-add inverse of :func:`_stft`, trimmed to n samples."""
    frames = np.fft.irfft(spec, n=_NFFT, axis=1) * _WINDOW  # (F, 512)
    n_frames = frames.shape[0]
    out = np.zeros((n_frames + _NFFT // _HOP - 1) * _HOP)
    for j in range(_NFFT // _HOP):  # hop divides n_fft: add the four shifted frame quarters
        out[j * _HOP: j * _HOP + n_frames * _HOP] += frames[:, j * _HOP:(j + 1) * _HOP].reshape(-1)
    return out[_NFFT // 2: _NFFT // 2 + n] / _OLA_GAIN


def _smooth(x: np.ndarray, k: int = 3) -> np.ndarray:
    ker = np.hanning(k + 2)[1:-1]
    ker /= ker.sum()
    return np.convolve(np.pad(x, (k // 2, k // 2), mode="edge"), ker, mode="valid")


def _draw_phones(rng: np.random.Generator, target: float) -> tuple[list[str], list[float]]:
    """A syllable sequence whose total duration (with edge silences) is close to ``target``."""
    sil0, sil1 = rng.uniform(0.12, 0.3), rng.uniform(0.12, 0.3)
    names, durs = ["sil"], [sil0]
    total = sil0 + sil1
    while True:
        syl = []
        if rng.random() < 0.8:
            syl.append(_CONS[rng.choice(len(_CONS), p=_C_P)])
            if rng.random() < 0.15:
                c2 = _CONS[rng.choice(len(_CONS), p=_C_P)]
                if _BY_NAME[c2].kind in (_A, _N):
                    syl.append(c2)
        syl.append(_VOWELS[rng.choice(len(_VOWELS), p=_V_P)])
        if rng.random() < 0.35:
            syl.append(_CONS[rng.choice(len(_CONS), p=_C_P)])
        d = [rng.uniform(*_BY_NAME[p].dur) for p in syl]
        if total + sum(d) > target and len(names) > 1:
            break
        names.extend(syl)
        durs.extend(d)
        total += sum(d)
        if rng.random() < 0.08:  # a short pause between words
            names.append("sil")
            durs.append(rng.uniform(0.08, 0.2))
            total += durs[-1]
    names.append("sil")
    durs.append(sil1)
    return names, durs


def synthesize_utterance(rng: np.random.Generator, target_seconds: float, f0_base: float,
                         vtl: float) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Synthesise one utterance of about ``target_seconds``.

    Args:
        rng: the utterance's generator; f0_base: speaker pitch (Hz); vtl: formant scale
            (a shorter vocal tract, vtl > 1, raises every formant).
    Returns:
        (n,) float64 audio (peak well below 1) and the alignment [(phone, start_s, end_s), ...].
    """
    names, durs = _draw_phones(rng, target_seconds)
    ends = np.cumsum(durs)
    starts = ends - np.asarray(durs)
    n = int(round(ends[-1] * SAMPLE_RATE))
    n_frames = n // _HOP + 1
    tf = np.arange(n_frames) * _HOP / SAMPLE_RATE  # frame centres (s)
    pid = np.minimum(np.searchsorted(ends, tf, side="right"), len(names) - 1)
    rel = (tf - starts[pid]) / np.asarray(durs)[pid]  # position inside the phone, [0, 1)

    formants = _formant_tracks(names, starts, ends, tf, vtl)
    voice, fric, asp, centre, width = _source_levels(names, pid, rel, vtl)
    pulses = _glottal_pulses(rng, tf, ends[-1], f0_base, n)
    noise_src = rng.standard_normal(n) * 0.1

    env_v = _formant_envelope(formants)
    env_n = _band_envelope(centre, width)
    spec = _stft(pulses, n_frames) * (env_v * voice[:, None]) \
        + _stft(noise_src, n_frames) * (env_n * fric[:, None] + env_v * asp[:, None])
    y = _istft(spec, n)
    level_db = rng.uniform(-28.0, -18.0)
    rms = np.sqrt(np.mean(y ** 2)) + 1e-12
    y = y * (10 ** (level_db / 20) / rms)
    y += rng.standard_normal(n) * 10 ** (-72 / 20)  # faint room noise
    align = [(p, float(s), float(e)) for p, s, e in zip(names, starts, ends)]
    return y, align


def _formant_tracks(names, starts, ends, tf: np.ndarray, vtl: float) -> np.ndarray:
    """(n_frames, 4) formant frequencies: targets at the centres of phones that have them,
    linear in between, scaled by ``vtl``."""
    anchor_t, anchor_f = [], []
    for i, p in enumerate(names):
        if p != "sil" and _BY_NAME[p].formants:
            anchor_t.append((starts[i] + ends[i]) / 2)
            anchor_f.append(_BY_NAME[p].formants)
    if not anchor_t:
        anchor_t, anchor_f = [0.0], [_SCHWA]
    anchor_f = np.asarray(anchor_f, dtype=np.float64) * vtl
    return np.stack([np.interp(tf, anchor_t, anchor_f[:, j]) for j in range(4)], axis=1)


def _source_levels(names, pid: np.ndarray, rel: np.ndarray, vtl: float):
    """Per frame: voicing, band-noise (frication) and formant-noise (aspiration) amplitudes,
    smoothed, and the frication band's centre and width."""
    n_frames = pid.shape[0]
    voice = np.zeros(n_frames)
    fric = np.zeros(n_frames)      # band-shaped noise amplitude
    asp = np.zeros(n_frames)       # formant-shaped noise amplitude (aspiration)
    centre = np.zeros(n_frames)
    width = np.ones(n_frames)
    for i, p in enumerate(names):
        sel = pid == i
        if p == "sil" or not sel.any():
            continue
        ph = _BY_NAME[p]
        r = rel[sel]
        centre[sel], width[sel] = ph.band[0] * vtl, ph.band[1]
        if ph.kind in (_V, _N, _A):
            voice[sel] = ph.voice
        elif ph.kind == "fric":
            if ph.name == "h":
                asp[sel] = ph.noise
            else:
                fric[sel] = ph.noise
        elif ph.kind == "vfric":
            voice[sel], fric[sel] = ph.voice, ph.noise
        else:  # stops: closure, burst, then aspiration (voiceless) or voicing (voiced)
            burst = (r >= 0.55) & (r < 0.7)
            fric[sel] = np.where(burst, ph.noise, 0.0)
            if ph.kind == "stop":
                asp[sel] = np.where(r >= 0.7, 0.25, 0.0)
            else:
                voice[sel] = np.where(r < 0.55, ph.voice, np.where(r >= 0.7, 0.5, 0.0))
    return _smooth(voice), _smooth(fric), _smooth(asp), centre, width


def _glottal_pulses(rng: np.random.Generator, tf: np.ndarray, dur: float, f0_base: float, n: int) -> np.ndarray:
    """(n,) unit pulses at the glottal closures of a pitch track with declination, a random
    accent curve and a little vibrato."""
    knots = np.linspace(0.0, dur, max(2, int(dur / 0.35)) + 1)
    accent = np.interp(tf, knots, rng.uniform(0.9, 1.15, knots.shape[0]))
    f0 = f0_base * (1.08 - 0.2 * tf / dur) * accent * (1 + 0.01 * np.sin(2 * np.pi * 5.0 * tf))
    f0_samples = np.interp(np.arange(n) / SAMPLE_RATE, tf, f0)
    phase = np.cumsum(f0_samples) / SAMPLE_RATE + rng.random()
    return np.diff(np.floor(phase), prepend=np.floor(phase[0])).astype(np.float64)


def _noise(rng: np.random.Generator, kind: int, seconds: float) -> np.ndarray:
    n = int(round(seconds * SAMPLE_RATE))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    white = rng.standard_normal(n)
    kind %= 6
    if kind == 0:
        y = white
    elif kind in (1, 2):  # pink (1/f power), brown (1/f^2 power)
        shape = 1.0 / np.maximum(f, 20.0) ** (0.5 * kind)
        y = np.fft.irfft(np.fft.rfft(white) * shape, n=n)
    elif kind == 3:  # mains hum with harmonics over a little pink noise
        t = np.arange(n) / SAMPLE_RATE
        y = sum(np.sin(2 * np.pi * 50.0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 12))
        y = y + 0.05 * np.fft.irfft(np.fft.rfft(white) / np.maximum(f, 20.0) ** 0.5 * 30, n=n)
    elif kind == 4:  # babble: four synthetic talkers
        y = np.zeros(n)
        for _ in range(4):
            talker, _ = synthesize_utterance(rng, seconds + 1.0, rng.uniform(90, 230), rng.uniform(0.9, 1.12))
            y += np.roll(np.resize(talker, n), int(rng.integers(n)))
    else:  # machine / fan: band noise with a slow wobble and a 120 Hz tone
        t = np.arange(n) / SAMPLE_RATE
        band = np.exp(-0.5 * ((f - 900.0) / 600.0) ** 2)
        y = np.fft.irfft(np.fft.rfft(white) * band, n=n) * (1 + 0.3 * np.sin(2 * np.pi * 7.0 * t))
        y = y / (np.sqrt(np.mean(y ** 2)) + 1e-12) + 0.3 * np.sin(2 * np.pi * 120.0 * t)
    y = y - y.mean()
    return y * (10 ** (rng.uniform(-30.0, -20.0) / 20) / (np.sqrt(np.mean(y ** 2)) + 1e-12))


def _write_wav(path: str, y: np.ndarray) -> int:
    # Quantise here (round to nearest, clip) so the bytes do not depend on libsndfile's rules.
    pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return int(pcm.shape[0])


def _speakers(seed: int, n: int = 6) -> list[tuple[float, float]]:
    rng = np.random.default_rng([seed, 7])
    # Half lower, half higher voices; formant scale loosely tied to pitch, as in people.
    f0 = np.concatenate([rng.uniform(90, 140, n // 2), rng.uniform(170, 240, n - n // 2)])
    vtl = np.clip(0.9 + (f0 - 90) / 150 * 0.2 + rng.uniform(-0.03, 0.03, n), 0.88, 1.15)
    return list(zip(f0.tolist(), vtl.tolist()))


def make_demo_corpus(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 160, n_val: int = 24,
                     n_noise: int = 6) -> DemoCorpus:
    """Write the demo corpus (module docstring) under ``out_dir`` and return its paths.

    The defaults give about 20 minutes of training speech (utterances 2 to 12 s, 6 speakers,
    phone transcripts in ``text``), 3 minutes of validation speech and 6 noise files of 6 to 10 s
    (white, pink, brown, hum, babble, machine): enough that the demo recipe's few hundred steps
    see each utterance only a few times. Runs in about ten seconds.
    """
    if n_train < 1 or n_val < 1 or n_noise < 1:
        raise ValueError(f"n_train, n_val and n_noise must be >= 1; got {n_train}, {n_val}, {n_noise}")
    root = os.path.abspath(os.fspath(out_dir))
    speakers = _speakers(seed)
    paths = {}
    for split_id, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        lines, align_lines = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            spk = int(rng.integers(len(speakers)))
            f0, vtl = speakers[spk]
            target = rng.uniform(2.0, 12.0)
            y, align = synthesize_utterance(rng, target, f0, vtl)
            rel = f"{split}/{split}_{i:05d}.wav"
            n = _write_wav(os.path.join(root, rel), y)
            text = " ".join(p for p, _, _ in align if p != "sil")
            lines.append({"audio_filepath": rel, "duration": n / SAMPLE_RATE, "text": text,
                          "speaker": f"spk{spk}"})
            align_lines.append({"audio_filepath": rel, "phones": [a[0] for a in align],
                                "starts": [round(a[1], 6) for a in align],
                                "ends": [round(a[2], 6) for a in align]})
        paths[split] = _write_jsonl(os.path.join(root, f"{split}.json"), lines)
        paths[f"{split}_alignment"] = _write_jsonl(os.path.join(root, f"{split}_alignment.json"), align_lines)
    os.makedirs(os.path.join(root, "noise"), exist_ok=True)
    names = ["white", "pink", "brown", "hum", "babble", "machine"]
    lines = []
    for j in range(n_noise):
        rng = np.random.default_rng([seed, 2, j])
        y = _noise(rng, j, rng.uniform(6.0, 10.0))
        rel = f"noise/{names[j % 6]}_{j:02d}.wav"
        n = _write_wav(os.path.join(root, rel), y)
        lines.append({"audio_filepath": rel, "duration": n / SAMPLE_RATE})
    paths["noise"] = _write_jsonl(os.path.join(root, "noise.json"), lines)
    return DemoCorpus(root=root, **paths)


def _write_jsonl(path: str, items: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path
