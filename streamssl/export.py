"""The pretrained encoder as a standalone file for fine-tuning and streaming.

``export_encoder(ckpt, out)`` writes the encoder weights, its constructor arguments and the feature
settings (with global statistics) of a pretraining checkpoint; ``load_encoder(path)`` rebuilds the
encoder from such a file (or directly from a pretraining checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from streamssl.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_strict
from streamssl.nn.encoder import FastConformerEncoder
from streamssl.ssl.features import LogMelFeatures

FORMAT = "streamssl-encoder"
VERSION = 1


def _from_pretraining(state: dict, source: str) -> dict:
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{source} is neither a pretraining checkpoint nor an exported encoder")
    cfg = OmegaConf.create(state["config"])
    enc_cfg = OmegaConf.to_container(cfg.model.encoder, resolve=True)
    feat_cfg = OmegaConf.to_container(cfg.model.features, resolve=True)
    feat_cfg.pop("stats", None)  # the statistics themselves travel in the features' buffers
    model = state["model"]
    encoder = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    features = {k[len("features."):]: v for k, v in model.items() if k.startswith("features.")}
    return {"format": FORMAT, "version": VERSION, "encoder_config": enc_cfg, "encoder": encoder,
            "features_config": feat_cfg, "features": features, "pretrain_step": int(state.get("step", 0))}


def _read(path: str | os.PathLike) -> dict:
    state = load_checkpoint(path)
    if state.get("format") == FORMAT:
        if state.get("version") != VERSION:
            raise CheckpointError(f"{path}: exported encoder version {state.get('version')}, expected {VERSION}")
        return state
    return _from_pretraining(state, str(path))


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the encoder of a pretraining checkpoint to ``out`` (atomically). Returns ``out``."""
    exported = _read(checkpoint)
    atomic_save(exported, out)
    return Path(out)


def load_encoder(path: str | os.PathLike, map_location="cpu", with_features: bool = False):
    """Rebuild the pretrained encoder (in eval mode).

    Args:
        path: a file from ``export_encoder`` / ``streamssl export``, or a pretraining
            checkpoint (``<run>/checkpoints/last.pt``).
        map_location: where to put the weights.
        with_features: also return the matching ``LogMelFeatures`` (its global statistics
            included), which turns 16 kHz audio into the encoder's input.
    Returns:
        ``FastConformerEncoder``, or ``(encoder, features)`` with ``with_features=True``.
    """
    state = _read(path)
    encoder = FastConformerEncoder(**state["encoder_config"])
    load_state_strict(encoder, state["encoder"], str(path))
    encoder.to(map_location).eval()
    if not with_features:
        return encoder
    features = LogMelFeatures(**state["features_config"])
    load_state_strict(features, state["features"], str(path))
    return encoder, features.to(map_location).eval()
