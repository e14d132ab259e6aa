"""Chunk-by-chunk streaming of an audio file through a pretrained encoder, with timing.

Audio is cut into the chunks the encoder's attention context allows (``stream_chunk_frames()``
feature frames), turned into features incrementally (``LogMelFeatures.stream_step``) and encoded
with ``stream_step``; the concatenated output is compared with the offline forward on the whole
file, so every run also checks that streaming and offline agree.
"""

from __future__ import annotations

import time

import torch


def stream_steps(encoder, features, audio: torch.Tensor, chunks_per_step: int = 1):
    """Feed one utterance chunk by chunk; yields each step's new encoder frames and its compute time.

    Args:
        encoder, features: in eval mode. audio: (N,) at ``features.sample_rate``, in the dtype to
            compute in. chunks_per_step: encoder chunks per step.
    Yields:
        ((1, n, D) new frames, seconds spent on the step, features and encoder both included).
    """
    step_frames = encoder.stream_chunk_frames() * chunks_per_step
    step_samples = step_frames * features.hop_length
    state = encoder.init_stream_state(1, device=audio.device)
    cache = None
    for start in range(0, max(audio.numel(), 1), step_samples):
        t0 = time.perf_counter()
        feats, cache = features.stream_step(audio[start : start + step_samples].unsqueeze(0), cache)
        k = feats.shape[1]  # <= step_frames
        last = start + step_samples >= audio.numel()
        if k < step_frames:
            feats = torch.nn.functional.pad(feats, (0, 0, 0, step_frames - k))
        out, out_len, state = encoder.stream_step(feats, torch.tensor([k]), state, final=last)
        yield out[:, : int(out_len[0])], time.perf_counter() - t0
        if last:
            return


@torch.no_grad()
def stream_audio(encoder, features, audio: torch.Tensor, chunks_per_step: int = 1) -> dict:
    """Stream one utterance through ``features`` + ``encoder`` and measure it.

    Args:
        encoder: FastConformerEncoder in eval mode. features: LogMelFeatures (normalize none/global).
        audio: (N,) float at ``features.sample_rate`` (cast to the encoder's dtype).
        chunks_per_step: encoder chunks fed per step (larger steps: more latency, less overhead).
    Returns:
        dict: ``output`` (T', D) streaming output, ``offline`` (T', D) whole-file output,
        ``max_abs_diff``, ``chunk_ms`` (audio per step), ``lookahead_ms``, ``latency_ms``
        (algorithmic), ``step_ms`` (list of compute times per step), ``rtf`` (compute / audio).
    """
    if encoder.training or features.training:
        raise RuntimeError("stream_audio needs eval mode (dropout and dither would change the output)")
    if audio.dim() != 1:
        raise ValueError(f"audio must be (N,), got shape {tuple(audio.shape)}")
    hop = features.hop_length
    step_frames = encoder.stream_chunk_frames() * chunks_per_step
    # Compute in the encoder's dtype (float32 normally; float64 gives a rounding-free comparison).
    audio = audio.to(next(encoder.parameters()).dtype)
    n_frames = audio.numel() // hop
    outputs, times = [], []
    for out, seconds in stream_steps(encoder, features, audio, chunks_per_step):
        outputs.append(out[0])
        times.append(seconds)
    streamed = torch.cat(outputs) if outputs else audio.new_zeros(0, encoder.d_model)
    offline_feats, feat_len = features(audio.unsqueeze(0), torch.tensor([audio.numel()]))
    offline, off_len = encoder(offline_feats, feat_len)
    offline = offline[0, : int(off_len[0])]
    diff = float((streamed - offline).abs().max()) if streamed.shape == offline.shape and streamed.numel() else float("nan")
    seconds = audio.numel() / features.sample_rate
    return {
        "output": streamed, "offline": offline, "max_abs_diff": diff, "frames": n_frames,
        "chunk_ms": step_frames * hop * 1000.0 / features.sample_rate,
        "lookahead_ms": encoder.lookahead_ms(), "latency_ms": encoder.latency_ms(),
        "step_ms": [t * 1000.0 for t in times], "rtf": sum(times) / max(seconds, 1e-9), "seconds": seconds,
    }
