"""Helpers shared by the data-pipeline tests: tiny WAV corpora and manifests written on the fly."""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

SR = 16000


def write_wav(path, x, sr: int = SR, subtype: str = "PCM_16") -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, x, sr, subtype=subtype)
    return str(path)


def write_manifest(path, items, raw_lines=None) -> str:
    """items: dicts written one per line; raw_lines: strings appended verbatim (for bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
        for line in raw_lines or []:
            f.write(line + "\n")
    return str(path)


def make_corpus(root, n: int = 12, seed: int = 0, min_s: float = 0.2, max_s: float = 1.0,
                name: str = "train", scale: float = 0.3):
    """n random-noise utterances of random lengths (PCM_16, 16 kHz) and a manifest with relative
    paths. Returns (manifest_path, list of int16 arrays as written)."""
    rng = np.random.default_rng(seed)
    items, waves = [], []
    for i in range(n):
        length = int(rng.integers(int(min_s * SR), int(max_s * SR) + 1))
        pcm = (rng.standard_normal(length) * scale * 32767).clip(-32768, 32767).astype(np.int16)
        rel = f"{name}/u{i:03d}.wav"
        write_wav(os.path.join(root, rel), pcm)
        items.append({"audio_filepath": rel, "duration": length / SR})
        waves.append(pcm)
    return write_manifest(os.path.join(root, f"{name}.json"), items), waves
