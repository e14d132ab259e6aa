"""The transcribed demo corpus: spoken commands by many synthetic voices, with held-out speakers.

Made on a fresh machine from pip packages alone: sentences from ``streamssl.data.sentences`` (a
grammar of numbers, times, dates, names and commands written by this project) rendered by eSpeak NG
(``streamssl.data.tts``) with voices that differ in variant (about 100 timbres), accent, pitch,
pitch range and rate, then resampled to 16 kHz, padded with silence, levelled and given a faint
noise floor.

Splits (NeMo manifests, paths relative to the manifest; audio as 16-bit FLAC)::

    pretrain.json  untranscribed speech for self-supervised pretraining (no "text" key), 1-3
                   sentences per utterance, training voices
    train.json     the small transcribed part for fine-tuning (minutes of audio), training voices
    val.json       validation: held-out voices, held-out sentences
    test.json      test: other held-out voices, held-out sentences
    noise.json     noise files for augmentation (white, pink, brown, hum, babble, machine)
    speakers.json  every voice and its split

No voice variant of val or test occurs in pretrain or train, and no val/test sentence occurs in
pretrain or train. The bytes are a function of the arguments and the installed eSpeak NG: each
utterance seeds eSpeak NG's noise generator (breathy and whispering voices) from (seed, split,
index), and the utterances are rendered in a fixed order.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf

from .sentences import sentences
from .tts import Espeak, Voice

__all__ = ["SpeechCorpus", "make_speech_corpus", "corpus_voices", "CORPUS_VERSION"]

SAMPLE_RATE = 16000
CORPUS_VERSION = 2  # bump when the corpus changes, so cached copies are rebuilt (2: seeded noise)
_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
            "en-gb-x-gbcwmd")
# Variants whose output is not a plain voice (whispered, heavily robotic) stay out of the held-out
# splits so that the test measures speaker generalisation, not a different kind of signal.
_UNUSUAL = {"whisper", "whisperf", "Demonic", "UniRobot", "anikaRobot", "croak", "robosoft", "robosoft2",
            "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8"}


@dataclass(frozen=True)
class SpeechCorpus:
    """Absolute paths written by :func:`make_speech_corpus`."""

    root: str
    pretrain: str
    train: str
    val: str
    test: str
    noise: str
    speakers: str


def _variants() -> list[str]:
    import espeakng_loader

    return sorted(os.listdir(os.path.join(espeakng_loader.get_data_path(), "voices", "!v")))


def corpus_voices(seed: int = 0, n_val_voices: int = 4, n_test_voices: int = 6) -> dict[str, list[Voice]]:
    """The voices of each split: {"train": [...], "val": [...], "test": [...]}.

    Held-out splits draw their variants from the usual voices, disjoint from training's; every
    variant gives one voice with an accent, pitch, range and rate drawn from ``seed``.
    """
    rng = np.random.default_rng([seed, 0x701CE])
    variants = _variants()
    usual = [v for v in variants if v not in _UNUSUAL]
    held = [usual[i] for i in rng.permutation(len(usual))[: n_val_voices + n_test_voices]]
    split_of = {v: "val" for v in held[:n_val_voices]} | {v: "test" for v in held[n_val_voices:]}
    voices: dict[str, list[Voice]] = {"train": [], "val": [], "test": []}
    for v in variants:
        voice = Voice(language=_ACCENTS[int(rng.integers(len(_ACCENTS)))], variant=v,
                      pitch=int(rng.integers(25, 76)), pitch_range=int(rng.integers(30, 91)),
                      rate=int(rng.integers(135, 196)), word_gap=int(rng.integers(0, 3)))
        voices[split_of.get(v, "train")].append(voice)
    return voices


def _render(tts: Espeak, voice: Voice, texts: list[str], rng: np.random.Generator) -> np.ndarray:
    """Sentences by one voice with pauses between them, edge silences, a level and a noise floor."""
    tts.set_voice(voice)
    parts = [np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE), np.float32)]
    for k, text in enumerate(texts):
        if k:
            parts.append(np.zeros(int(rng.uniform(0.15, 0.5) * SAMPLE_RATE), np.float32))
        parts.append(tts.synthesize(text))
    parts.append(np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE), np.float32))
    y = np.concatenate(parts).astype(np.float64)
    rms = np.sqrt(np.mean(y ** 2)) + 1e-12
    y *= 10 ** (rng.uniform(-28.0, -16.0) / 20) / rms
    y += rng.standard_normal(y.shape[0]) * 10 ** (rng.uniform(-75.0, -60.0) / 20)
    return y


def _write_flac(path: str, y: np.ndarray) -> int:
    pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return int(pcm.shape[0])


def _write_jsonl(path: str, items: list[dict]) -> str:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    os.replace(tmp, path)
    return path


def make_speech_corpus(out_dir: str | os.PathLike, seed: int = 0, n_pretrain: int = 1000, n_train: int = 240,
                       n_val: int = 80, n_test: int = 160, n_noise: int = 6, progress: bool = False) -> SpeechCorpus:
    """Write the corpus (module docstring) under ``out_dir``; returns its paths.

    Defaults: about 75 min of untranscribed pretraining speech (1 to 3 sentences per utterance),
    12 min of transcribed training speech, 4 min of validation and 8 min of test speech on held-out
    voices. About a minute on one core. Manifests are written last, so an interrupted run leaves
    no manifest that lists missing audio.
    """
    for name, value in (("n_pretrain", n_pretrain), ("n_train", n_train), ("n_val", n_val),
                        ("n_test", n_test), ("n_noise", n_noise)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    from .demo import _noise  # the synthetic noise kinds of the phone corpus

    root = os.path.abspath(os.fspath(out_dir))
    voices = corpus_voices(seed)
    n_seen = n_pretrain * 2 + n_train
    pool = sentences(n_seen + n_val + n_test, seed)
    seen, held = pool[:n_seen], pool[n_seen:]
    plan = {  # split -> (count, voices, sentences, sentences per utterance, transcribed)
        "pretrain": (n_pretrain, voices["train"], seen, (1, 4), False),
        "train": (n_train, voices["train"], seen, (1, 2), True),
        "val": (n_val, voices["val"], held[:n_val], (1, 2), True),
        "test": (n_test, voices["test"], held[n_val:], (1, 2), True),
    }
    tts = Espeak(SAMPLE_RATE)
    if not tts.seed(0):
        warnings.warn("eSpeak NG older than 1.52 cannot seed its noise generator: the breathy and whispering "
                      "voices of the corpus will differ from build to build (pip install -U espeakng-loader)",
                      RuntimeWarning, stacklevel=2)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(p[0] for p in plan.values()), desc="speech corpus", unit="utt")
    manifests = {}
    for split_id, (split, (count, split_voices, texts, per_utt, transcribed)) in enumerate(plan.items()):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        lines = []
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            voice = split_voices[int(rng.integers(len(split_voices)))]
            k = int(rng.integers(*per_utt))
            chosen = [texts[int(j)] for j in rng.choice(len(texts), size=k, replace=False)] \
                if split in ("pretrain", "train") else [texts[i % len(texts)]]
            rel = f"{split}/{split}_{i:05d}.flac"
            tts.seed(((seed * 8 + split_id) * 1_000_003 + i) % 2**31)
            n = _write_flac(os.path.join(root, rel), _render(tts, voice, chosen, rng))
            line = {"audio_filepath": rel, "duration": n / SAMPLE_RATE}
            if transcribed:
                line["text"] = " ".join(chosen)
            line["speaker"] = voice.name
            lines.append(line)
            if bar is not None:
                bar.update(1)
        manifests[split] = lines
    if bar is not None:
        bar.close()
    os.makedirs(os.path.join(root, "noise"), exist_ok=True)
    kinds = ["white", "pink", "brown", "hum", "babble", "machine"]
    noise_lines = []
    for j in range(n_noise):
        rng = np.random.default_rng([seed, 9, j])
        rel = f"noise/{kinds[j % 6]}_{j:02d}.flac"
        n = _write_flac(os.path.join(root, rel), _noise(rng, j, rng.uniform(6.0, 10.0)))
        noise_lines.append({"audio_filepath": rel, "duration": n / SAMPLE_RATE})
    paths = {split: _write_jsonl(os.path.join(root, f"{split}.json"), lines) for split, lines in manifests.items()}
    paths["noise"] = _write_jsonl(os.path.join(root, "noise.json"), noise_lines)
    speaker_rows = [{"split": s, **asdict(v), "name": v.name} for s, vs in voices.items() for v in vs]
    paths["speakers"] = _write_jsonl(os.path.join(root, "speakers.json"), speaker_rows)
    return SpeechCorpus(root=root, **paths)
