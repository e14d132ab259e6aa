"""``streamssl transcribe``: greedy CTC transcripts of files or a manifest, offline or streaming.

Standard output carries one ``path<TAB>hypothesis`` line per input and, when the manifest has
``text``, a last line ``WER <x> CER <y>`` (corpus level, percent). Timing and latency go to
standard error, so the output stays machine-readable. ``--out`` is written once, atomically,
after every input was transcribed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from streamssl.asr.metrics import ErrorCounts
from streamssl.asr.model import CTCModel, load_ctc_model
from streamssl.data.audio import load_audio


def read_inputs(audio: list[str], manifest: str | None) -> tuple[list[dict], bool]:
    """The items to transcribe (each the manifest line, or ``{"audio_filepath": path}``) and
    whether they carry reference text (then every one must: a clear error names the line)."""
    from streamssl.data.manifest import load_manifest

    if manifest is None and not audio:
        raise ValueError("no input: give audio files or --manifest")
    items = [{"audio_filepath": a} for a in audio]
    for a in audio:
        if not os.path.isfile(a):
            raise FileNotFoundError(f"audio file not found: {a}")
    has_text = False
    if manifest is not None:
        index = load_manifest(manifest)  # validates every line, naming it
        rows = [json.loads(ln) for ln in Path(manifest).read_text(encoding="utf-8").splitlines() if ln.strip()]
        has_text = any("text" in r for r in rows)
        if has_text:  # scoring needs every transcript: the same check names the first bad line
            load_manifest(manifest, require_text=True)
        for i, item in enumerate(rows):
            item["_path"], item["_offset"], item["_duration"] = index.path(i), float(index.offsets[i]), float(index.durations[i])
            items.append(item)
    return items, has_text


def _load(item: dict, sample_rate: int) -> np.ndarray:
    if "_path" in item:
        return load_audio(item["_path"], offset=item["_offset"], duration=item["_duration"], sample_rate=sample_rate)
    return load_audio(item["audio_filepath"], sample_rate=sample_rate)


def _check_length(model: CTCModel, audio: np.ndarray, where: str) -> None:
    factor = model.encoder.subsampling_factor
    need = factor * model.features.hop_length
    if audio.shape[0] < need:
        raise ValueError(f"{where}: {audio.shape[0] / model.features.sample_rate * 1000:.0f} ms of audio is "
                         f"shorter than one encoder frame ({need * 1000 // model.features.sample_rate} ms)")


def transcribe_offline(model: CTCModel, tokenizer, items: list[dict], batch_seconds: float = 120.0,
                       on_result=None) -> list[str]:
    """Hypotheses for ``items`` in order, decoding batches of up to ``batch_seconds`` of audio."""
    sr = model.features.sample_rate
    hyps: list[str] = []
    batch: list[np.ndarray] = []

    def flush():
        if not batch:
            return
        lengths = torch.tensor([a.shape[0] for a in batch], dtype=torch.int64)
        x = torch.zeros(len(batch), int(lengths.max()))
        for b, a in enumerate(batch):
            x[b, : a.shape[0]] = torch.from_numpy(a)
        for ids in model.transcribe_tokens(x, lengths):
            hyps.append(tokenizer.decode(ids))
            if on_result is not None:
                on_result(len(hyps) - 1, hyps[-1])
        batch.clear()

    for item in items:
        audio = _load(item, sr)
        _check_length(model, audio, item["audio_filepath"])
        if batch and (sum(a.shape[0] for a in batch) + audio.shape[0]) / sr > batch_seconds:
            flush()
        batch.append(audio)
    flush()
    return hyps


def transcribe_streaming(model: CTCModel, tokenizer, items: list[dict], chunks_per_step: int = 1,
                         partial=None, on_result=None) -> tuple[list[str], list[float]]:
    """Hypotheses of chunk-by-chunk decoding, and every step's compute time in ms."""
    sr = model.features.sample_rate
    hyps, steps = [], []
    for i, item in enumerate(items):
        audio = _load(item, sr)
        _check_length(model, audio, item["audio_filepath"])
        cb = (lambda ids: partial(item["audio_filepath"], tokenizer.decode(ids))) if partial else None
        r = model.stream(torch.from_numpy(audio), chunks_per_step=chunks_per_step, on_tokens=cb)
        hyps.append(tokenizer.decode(r["tokens"]))
        steps += r["step_ms"]
        if on_result is not None:
            on_result(i, hyps[-1])
    return hyps, steps


def transcribe_onnx(model, items: list[dict], partial=None, on_result=None) -> tuple[list[str], list[float]]:
    """``transcribe_streaming`` with an exported graph (``streamssl.runtime.OnnxStreamingEncoder``)."""
    sr = model.features.sample_rate
    need = model.subsampling_factor * model.features.hop_length
    hyps, steps = [], []
    for i, item in enumerate(items):
        audio = _load(item, sr)
        if audio.shape[0] < need:
            raise ValueError(f"{item['audio_filepath']}: {audio.shape[0] / sr * 1000:.0f} ms of audio is shorter "
                             f"than one encoder frame ({need * 1000 // sr} ms)")
        cb = (lambda ids: partial(item["audio_filepath"], model.decode(ids))) if partial else None
        r = model.stream(audio, on_tokens=cb)
        hyps.append(r["text"])
        steps += r["step_ms"]
        if on_result is not None:
            on_result(i, hyps[-1])
    return hyps, steps


def _load_onnx(args):
    from streamssl.runtime import OnnxStreamingEncoder

    if args.chunks_per_step != 1:
        raise ValueError("--onnx: the chunk is fixed at export (streamssl export --onnx --chunks-per-step)")
    pair = None
    if args.att_context_size:
        pair = [int(v) for v in args.att_context_size.split(",")]
    m = OnnxStreamingEncoder(args.model, threads=args.threads or 1, att_context_size=pair)
    if m.output != "log_probs" or m.vocabulary is None or m.features is None:
        raise ValueError(f"{args.model}: not a fine-tuned model's graph (export one with "
                         "`streamssl export --onnx --model RUN_DIR`)")
    return m


def write_predictions(path: str, items: list[dict], hyps: list[str]) -> None:
    """JSON lines: each input line (or ``audio_filepath``) plus ``pred_text``; atomic."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for item, hyp in zip(items, hyps):
            clean = {k: v for k, v in item.items() if not k.startswith("_")}
            f.write(json.dumps({**clean, "pred_text": hyp}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def transcribe_command(args) -> int:
    """The CLI: load, decode, print, score, write."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunks_per_step < 1:
        raise ValueError(f"--chunks-per-step must be >= 1, got {args.chunks_per_step}")
    onnx = getattr(args, "onnx", False)
    if onnx:
        model, tokenizer = _load_onnx(args), None
    else:
        model, tokenizer = load_ctc_model(args.model)
    if args.att_context_size and not onnx:
        try:
            pair = [int(v) for v in args.att_context_size.split(",")]
        except ValueError:
            raise ValueError(f"--att-context-size: expected L,R, got {args.att_context_size!r}") from None
        model.encoder.set_default_att_context_size(pair)
    items, has_text = read_inputs(args.audio, args.manifest)
    live = (args.streaming or onnx) and sys.stdout.isatty()

    def partial(path, text):
        if live:
            sys.stdout.write(f"\r\033[K{path}\t{text}")
            sys.stdout.flush()

    def on_result(i, hyp):
        prefix = "\r\033[K" if live else ""
        print(f"{prefix}{items[i]['audio_filepath']}\t{hyp}", flush=True)

    t0 = time.perf_counter()
    if onnx:
        hyps, steps = transcribe_onnx(model, items, partial, on_result)
    elif args.streaming:
        hyps, steps = transcribe_streaming(model, tokenizer, items, args.chunks_per_step, partial, on_result)
    else:
        hyps, steps = transcribe_offline(model, tokenizer, items, args.batch_seconds, on_result), []
    elapsed = time.perf_counter() - t0
    seconds = sum(float(it.get("_duration", 0.0)) for it in items) or None
    if onnx:
        chunk_ms = model.chunk_frames * model.features.hop_length * 1000 / model.features.sample_rate
        print(f"att_context_size={list(model.att_context_size)} (onnxruntime): chunk {chunk_ms:.0f} ms, "
              f"lookahead {model.lookahead_ms:.0f} ms, algorithmic latency {model.latency_ms:.0f} ms", file=sys.stderr)
    else:
        enc = model.encoder
        print(f"att_context_size={list(enc.att_context_size)}: chunk {enc.chunk_ms() * args.chunks_per_step:.0f} ms, "
              f"lookahead {enc.lookahead_ms():.0f} ms, algorithmic latency {enc.latency_ms():.0f} ms", file=sys.stderr)
    if steps:
        s = sorted(steps)
        print(f"streaming: {len(s)} steps, compute per step mean {sum(s) / len(s):.2f} ms, "
              f"p95 {s[min(len(s) - 1, int(0.95 * len(s)))]:.2f} ms", file=sys.stderr)
    if seconds:
        print(f"real-time factor {elapsed / seconds:.3f} ({seconds:.1f} s of audio in {elapsed:.1f} s)", file=sys.stderr)
    if args.out:
        write_predictions(args.out, items, hyps)
        print(f"wrote {args.out}", file=sys.stderr)
    if has_text:
        counts = ErrorCounts()
        for item, hyp in zip(items, hyps):
            if "text" in item:
                counts.add(item["text"], hyp)
        print(f"WER {counts.wer:.2f} CER {counts.cer:.2f}")
    return 0
