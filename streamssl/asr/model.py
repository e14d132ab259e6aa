"""The recogniser: log-mel features -> streaming FastConformer -> CTC head, offline and chunk by chunk.

Fine-tuning trains it (``streamssl finetune``); ``streamssl transcribe`` loads it. A fine-tuned
model file is self-contained: the encoder and feature settings, all weights (with the features'
global statistics) and the sentencepiece model travel in one checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from streamssl.asr.ctc import CTCHead, StreamingGreedyDecoder, greedy_tokens
from streamssl.asr.specaugment import SpecAugment
from streamssl.asr.tokenizer import Tokenizer
from streamssl.checkpoint import CheckpointError, load_checkpoint, load_state_strict
from streamssl.nn.encoder import FastConformerEncoder
from streamssl.ssl.features import LogMelFeatures


class CTCModel(nn.Module):
    """Features + encoder + SpecAugment (training only) + CTC head.

    Args:
        encoder_config: ``FastConformerEncoder`` arguments. features_config: ``LogMelFeatures``
            arguments (normalize none or global). vocab_size: sentencepiece pieces (blank = V).
        specaugment: ``SpecAugment`` arguments, or None for none.
    """

    def __init__(self, encoder_config: dict, features_config: dict, vocab_size: int, specaugment: dict | None = None,
                 seed: int = 0):
        super().__init__()
        self.encoder_config, self.features_config = dict(encoder_config), dict(features_config)
        self.features = LogMelFeatures(**self.features_config, seed=seed)
        self.encoder = FastConformerEncoder(**self.encoder_config, att_context_seed=seed)
        self.specaugment = SpecAugment(**(specaugment or {"freq_masks": 0, "time_masks": 0}))
        self.head = CTCHead(self.encoder.d_model, vocab_size)

    @property
    def blank_id(self) -> int:
        return self.head.blank_id

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, generator: torch.Generator | None = None):
        """(B, N) float audio, (B,) int64 -> (B, T', V + 1) log-probs (float32, or float64 for a
        float64 model), (B,) int64 frames."""
        feats, lengths = self.features(audio, audio_lengths, generator=generator)
        feats = self.specaugment(feats, lengths, generator=generator)
        encoded, out_lengths = self.encoder(feats, lengths)
        return self.head(encoded), out_lengths

    @torch.no_grad()
    def transcribe_tokens(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> list[list[int]]:
        """Offline greedy CTC piece ids per row (eval mode)."""
        log_probs, lengths = self(audio.to(self.head.proj.weight.dtype), audio_lengths)
        return greedy_tokens(log_probs, lengths, self.blank_id)

    @torch.no_grad()
    def stream(self, audio: torch.Tensor, chunks_per_step: int = 1, on_tokens=None) -> dict:
        """Greedy CTC of one utterance fed chunk by chunk through the cache-aware encoder.

        Args:
            audio: (N,) float32 at the feature rate. chunks_per_step: encoder chunks per step.
            on_tokens: called with the piece ids so far after every step (partial hypotheses).
        Returns:
            dict: ``tokens`` (list[int], equal to the offline ones), ``step_ms``, ``chunk_ms``,
            ``lookahead_ms``, ``latency_ms``, ``rtf``, ``seconds``.
        """
        if self.training:
            raise RuntimeError("stream needs eval mode (dropout, dither and SpecAugment would change the output)")
        if audio.dim() != 1:
            raise ValueError(f"audio must be (N,), got shape {tuple(audio.shape)}")
        from streamssl.stream import stream_steps

        enc, feats_mod = self.encoder, self.features
        audio = audio.to(self.head.proj.weight.dtype)  # float64 models give a rounding-free comparison
        decoder = StreamingGreedyDecoder(1, self.blank_id)
        times = []
        for out, seconds in stream_steps(enc, feats_mod, audio, chunks_per_step):
            t0 = time.perf_counter()
            decoder.step(self.head(out), torch.tensor([out.shape[1]]))
            times.append(seconds + time.perf_counter() - t0)
            if on_tokens is not None:
                on_tokens(decoder.tokens[0])
        step_samples = enc.stream_chunk_frames() * chunks_per_step * feats_mod.hop_length
        seconds = audio.numel() / feats_mod.sample_rate
        return {"tokens": decoder.tokens[0], "step_ms": [t * 1000.0 for t in times],
                "chunk_ms": step_samples * 1000.0 / feats_mod.sample_rate, "lookahead_ms": enc.lookahead_ms(),
                "latency_ms": enc.latency_ms(), "rtf": sum(times) / max(seconds, 1e-9), "seconds": seconds}


FORMAT = "streamssl-ctc"


def model_state(model: CTCModel, tokenizer: Tokenizer) -> dict:
    """What a fine-tuning checkpoint carries so that ``load_ctc_model`` can rebuild the model."""
    return {"format": FORMAT, "encoder_config": model.encoder_config, "features_config": model.features_config,
            "tokenizer": tokenizer.model_proto}


def resolve_model_path(path: str | os.PathLike, arg: str = "--model") -> Path:
    """A checkpoint path; a run directory means its ``checkpoints/last.pt``. ``arg`` names the
    option in the error."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{arg} {path}: no such file or run directory with checkpoints/last.pt")
    return p


def load_ctc_model(path: str | os.PathLike, map_location="cpu") -> tuple[CTCModel, Tokenizer]:
    """A fine-tuned recogniser in eval mode and its tokenizer, from a run directory or checkpoint."""
    p = resolve_model_path(path)
    state = load_checkpoint(p, map_location=map_location)
    if state.get("format") != FORMAT:
        what = "a pretraining checkpoint or exported encoder" if "encoder" in state or "config" in state else "not a model"
        raise CheckpointError(f"{p}: has no CTC head ({what}); fine-tune it first with `streamssl finetune --init {path}`")
    tokenizer = Tokenizer(state["tokenizer"], source=str(p))
    model = CTCModel(state["encoder_config"], state["features_config"], tokenizer.vocab_size)
    load_state_strict(model, state["model"], str(p))
    return model.to(map_location).eval(), tokenizer


def read_init(path: str | os.PathLike) -> dict:
    """Encoder and features (configs and weights) of a run directory, checkpoint or exported encoder."""
    from streamssl.export import _read

    p = resolve_model_path(path, "--init")
    state = load_checkpoint(p)
    if state.get("format") == FORMAT:
        model = state["model"]
        pick = lambda prefix: {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}  # noqa: E731
        return {"encoder_config": state["encoder_config"], "features_config": state["features_config"],
                "encoder": pick("encoder."), "features": pick("features."), "source": str(p)}
    try:
        exported = _read(p)
    except CheckpointError as e:
        raise CheckpointError(f"--init {path}: {e}") from None
    return {**exported, "source": str(p)}
