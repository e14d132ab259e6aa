"""Streaming inference with an exported graph: numpy + onnxruntime only (importing this does not
import torch).

::

    m = OnnxStreamingEncoder("enc.onnx", threads=1)        # from streamssl.onnx_export / `streamssl export --onnx`
    state = m.init_stream_state(batch_size)
    out, out_lengths, state = m.stream_step(chunk, chunk_lengths, state)   # (B, k, F) float32, (B,) int64
    m.stream_chunk_frames()

The same contract as ``FastConformerEncoder.stream_step`` on numpy arrays: ``chunk`` holds a multiple
of ``stream_chunk_frames()`` feature frames (the graph's fixed chunk), a row ends in the step where
its ``chunk_lengths`` is below the chunk size (or with ``final=True``) and must send 0 afterwards.
For a model exported with its CTC head, ``out`` is log-probabilities (B, n, V + 1).

``LogMelFeaturesNumpy`` computes the model's log-mel features chunk by chunk (the graph takes
features), and ``OnnxStreamingEncoder.stream(audio)`` runs audio through features, the graph and
greedy CTC, with timing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OnnxStreamingEncoder", "OnnxStreamState", "LogMelFeaturesNumpy", "StreamStateError"]

FORMAT = "streamssl-onnx-stream"
_INT_STATE = ("feat_lengths", "processed")


class StreamStateError(ValueError):
    """A state that does not fit the model (other batch size, context or cache shape)."""


@dataclass
class OnnxStreamState:
    """The stream state of ``OnnxStreamingEncoder``: named numpy tensors (the graph's state inputs)
    plus bookkeeping. ``tensors`` maps ``feat_lengths``, ``processed``, ``sub{s}``, ``layer{i}.k|v|conv``
    to arrays; ``ended`` is per row. Not modified by ``stream_step``."""

    batch_size: int
    att_context_size: tuple[int, int]
    chunk_frames: int
    tensors: dict[str, np.ndarray]
    ended: tuple[bool, ...] = field(default=())

    def nbytes_per_stream(self) -> int:
        """Bytes of state per row (the growing caches of an unlimited left context at their current size)."""
        return sum(t.nbytes for t in self.tensors.values()) // max(self.batch_size, 1)


# -- features ---------------------------------------------------------------------------------------
def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    logstep = math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep,
                    f / f_sp)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (np.maximum(m, min_log_mel) - min_log_mel)),
                    f_sp * m)


class LogMelFeaturesNumpy:
    """``streamssl.ssl.features.LogMelFeatures.stream_step`` in numpy (float64 inside, float32 out).

    Built from the feature settings stored in an exported graph's metadata (``normalize`` none or
    global, with the global statistics).
    """

    def __init__(self, sample_rate=16000, n_mels=80, win_length=400, hop_length=160, n_fft=512, preemph=0.97,
                 fmin=0.0, fmax=None, log_floor=2.0 ** -24, normalize="none", mean=None, std=None):
        if normalize not in ("none", "global"):
            raise ValueError(f"streaming features need normalize none or global, got {normalize!r}")
        self.sample_rate, self.n_mels = int(sample_rate), int(n_mels)
        self.win_length, self.hop_length, self.n_fft = int(win_length), int(hop_length), int(n_fft)
        self.preemph, self.log_floor, self.normalize = float(preemph), float(log_floor), normalize
        fmax = sample_rate / 2.0 if fmax is None else float(fmax)
        freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
        edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
        lo, ce, hi = edges[:-2], edges[1:-1], edges[2:]
        rise = (freqs[:, None] - lo[None, :]) / (ce - lo)[None, :]
        fall = (hi[None, :] - freqs[:, None]) / (hi - ce)[None, :]
        self.fb = np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (hi - lo))[None, :]
        n = np.arange(win_length)
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (win_length - 1)) if win_length > 1 else np.ones(1)
        self.window = np.pad(window, (0, n_fft - win_length))
        self.mean = np.zeros(n_mels) if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = np.ones(n_mels) if std is None else np.asarray(std, dtype=np.float64)

    @property
    def cache_samples(self) -> int:
        return self.win_length - self.hop_length + 1

    def init_stream_cache(self, batch_size: int) -> np.ndarray:
        return np.zeros((batch_size, self.cache_samples), dtype=np.float64)

    def stream_step(self, chunk: np.ndarray, cache: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, n) audio -> (features (B, k, n_mels) float32 of the frames it completes, new cache)."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ValueError(f"chunk: expected (B, n) audio, got shape {chunk.shape}")
        if cache is None:
            cache = self.init_stream_cache(chunk.shape[0])
        xp = np.concatenate([cache, chunk.astype(np.float64)], axis=1)
        n_frames = (xp.shape[1] - self.cache_samples) // self.hop_length
        if n_frames == 0:
            return np.zeros((chunk.shape[0], 0, self.n_mels), dtype=np.float32), xp
        y = xp[:, 1:] - self.preemph * xp[:, :-1]
        y = np.pad(y, ((0, 0), (0, self.n_fft - self.win_length)))
        idx = np.arange(n_frames)[:, None] * self.hop_length + np.arange(self.n_fft)[None, :]
        spec = np.fft.rfft(y[:, idx] * self.window, axis=-1)
        power = spec.real ** 2 + spec.imag ** 2
        feats = np.log(power @ self.fb + self.log_floor)
        if self.normalize == "global":
            feats = (feats - self.mean) / self.std
        return feats.astype(np.float32), xp[:, n_frames * self.hop_length:]


# -- the encoder ------------------------------------------------------------------------------------
class OnnxStreamingEncoder:
    """An exported stream step (``streamssl.onnx_export``) with the encoder's streaming API.

    Args:
        path: the .onnx file.
        threads: onnxruntime intra-op threads (1: as on a device).
        att_context_size: when given, the (left, right) context the caller expects; a graph
            exported for another context is refused.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, att_context_size=None):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("streamssl.runtime needs onnxruntime: pip install 'streamssl[deploy]'") from None
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a streamssl streaming graph (export one with `streamssl export --onnx`)")
        self.metadata = meta
        self.att_context_size = tuple(json.loads(meta["att_context_size"]))
        self.att_context_style = meta["att_context_style"]
        if att_context_size is not None and tuple(int(v) for v in att_context_size) != self.att_context_size:
            raise ValueError(
                f"{self.path} was exported for att_context_size={list(self.att_context_size)}, not "
                f"{[int(v) for v in att_context_size]}; export the model again with that context"
            )
        self.chunk_frames = int(meta["chunk_frames"])
        self.encoder_frames_per_step = int(meta["encoder_frames_per_step"])
        self.subsampling_factor = int(meta["subsampling_factor"])
        self.feat_in, self.d_model = int(meta["feat_in"]), int(meta["d_model"])
        self.output = meta["output"]
        self.state_spec = [(n, tuple(s)) for n, s in json.loads(meta["state"])]
        self.blank_id = int(meta["blank_id"]) if "blank_id" in meta else None
        self.vocabulary = json.loads(meta["vocabulary"]) if "vocabulary" in meta else None
        self.features = LogMelFeaturesNumpy(**json.loads(meta["features"])) if "features" in meta else None
        self.lookahead_ms = float(meta.get("lookahead_ms", "nan"))
        self.latency_ms = float(meta.get("latency_ms", "nan"))
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._state_names = [n for n, _ in self.state_spec]

    def stream_chunk_frames(self) -> int:
        """Feature frames per step (the graph's fixed chunk; ``stream_step`` takes any multiple)."""
        return self.chunk_frames

    def init_stream_state(self, batch_size: int) -> OnnxStreamState:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        B = int(batch_size)
        tensors = {}
        for name, shape in self.state_spec:
            shape = tuple(B if d == "B" else 0 if d == "N" else d for d in shape)
            tensors[name] = np.zeros(shape, dtype=np.int64 if name in _INT_STATE else np.float32)
        return OnnxStreamState(B, self.att_context_size, self.chunk_frames, tensors, (False,) * B)

    def _check_state(self, state, B: int) -> None:
        if not isinstance(state, OnnxStreamState):
            raise StreamStateError(f"state must come from init_stream_state / stream_step, got {type(state).__name__}")
        if state.batch_size != B:
            raise StreamStateError(f"state was built for batch size {state.batch_size} but chunk has {B} rows")
        if tuple(state.att_context_size) != self.att_context_size or state.chunk_frames != self.chunk_frames:
            raise StreamStateError(
                f"state was built for att_context_size={list(state.att_context_size)} with {state.chunk_frames}-frame "
                f"chunks, this graph streams {list(self.att_context_size)} with {self.chunk_frames}-frame chunks"
            )
        n_cache = None
        for name, spec in self.state_spec:
            t = state.tensors.get(name)
            if t is None:
                raise StreamStateError(f"state has no tensor {name!r}")
            dtype = np.int64 if name in _INT_STATE else np.float32
            ok = t.ndim == len(spec) and t.dtype == dtype
            for got, want in zip(t.shape, spec):
                if want == "B":
                    ok &= got == B
                elif want == "N":
                    n_cache = got if n_cache is None else n_cache
                    ok &= got == n_cache
                else:
                    ok &= got == want
            if not ok:
                want = tuple(B if d == "B" else d for d in spec)
                raise StreamStateError(
                    f"state tensor {name!r} has shape {t.shape} ({t.dtype}), the graph expects {want} "
                    f"({np.dtype(dtype).name}): a stale state or one from another model"
                )

    def stream_step(self, chunk, chunk_lengths, state: OnnxStreamState, *, final: bool = False):
        """Encode the next chunk of every row; as ``FastConformerEncoder.stream_step``.

        Args:
            chunk: (B, T, feat_in) float32 features, T a positive multiple of ``stream_chunk_frames()``.
            chunk_lengths: (B,) integer valid frames per row (a row below T ends in this step).
            state: from ``init_stream_state`` or the previous call; not modified.
            final: end every row in this step.
        Returns:
            (out (B, n, D) or (B, n, V + 1) log-probs, zero beyond out_lengths for encoder frames;
            out_lengths (B,) int64; the new state).
        """
        chunk = np.asarray(chunk)
        if chunk.ndim != 3 or chunk.shape[2] != self.feat_in or chunk.shape[0] < 1:
            raise ValueError(f"chunk must have shape (B, T, feat_in={self.feat_in}), got {chunk.shape}")
        if not np.issubdtype(chunk.dtype, np.floating):
            raise ValueError(f"chunk must be floating point, got {chunk.dtype}")
        B, T, _ = chunk.shape
        step = self.chunk_frames
        if T == 0 or T % step:
            raise ValueError(
                f"chunk has {T} frames but this graph streams in multiples of stream_chunk_frames() = {step}; "
                "pad the last chunk and pass chunk_lengths"
            )
        cl = np.asarray(chunk_lengths)
        if cl.shape != (B,) or not np.issubdtype(cl.dtype, np.integer):
            raise ValueError(f"chunk_lengths must be a ({B},) integer array, got {cl.shape} {cl.dtype}")
        self._check_state(state, B)
        cl = cl.astype(np.int64)
        if (cl < 0).any() or (cl > T).any():
            raise ValueError(f"chunk_lengths must be in [0, {T}] (the chunk's frames), got {cl.tolist()}")
        if any(e and n > 0 for e, n in zip(state.ended, cl.tolist())):
            raise ValueError(f"chunk_lengths must be 0 for rows that already ended ({list(state.ended)}), got {cl.tolist()}")
        ended = tuple(e or final or n < T for e, n in zip(state.ended, cl.tolist()))
        chunk = chunk.astype(np.float32, copy=False)
        tensors = state.tensors
        outs, lens = [], np.zeros(B, dtype=np.int64)
        for j in range(T // step):
            feed = {"chunk": np.ascontiguousarray(chunk[:, j * step : (j + 1) * step]),
                    "chunk_lengths": np.clip(cl - j * step, 0, step)}
            feed.update(tensors)
            res = self.session.run(None, feed)
            outs.append(res[0])
            lens += res[1]
            tensors = dict(zip(self._state_names, res[2:]))
        out = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
        return out, lens, OnnxStreamState(B, state.att_context_size, state.chunk_frames, tensors, ended)

    # ---- audio in, tokens out -------------------------------------------------------------------

    def decode(self, tokens) -> str:
        """Text of piece ids as sentencepiece decodes them: "▁" is a space (not before the first
        piece), ``<unk>`` is " ⁇ ", ids outside the vocabulary (the blank) are dropped."""
        if self.vocabulary is None:
            raise ValueError(f"{self.path} has no vocabulary (export a fine-tuned model)")
        out = []
        for t in tokens:
            if not 0 <= t < len(self.vocabulary):
                continue
            piece = self.vocabulary[t]
            if piece == "<unk>":
                out.append(" \u2047 ")
                continue
            text = piece.replace("\u2581", " ")
            out.append(text[1:] if not out and text.startswith(" ") else text)
        return "".join(out)

    def stream(self, audio: np.ndarray, on_tokens=None) -> dict:
        """Stream one utterance ((N,) float audio at the feature rate) through features, the graph
        and, for a CTC graph, greedy decoding.

        Returns:
            dict: ``output`` (T', D or V + 1) the valid frames, ``tokens`` and ``text`` (CTC graphs),
            ``step_ms``, ``chunk_ms``, ``lookahead_ms``, ``latency_ms``, ``rtf``, ``seconds``.
        """
        if self.features is None:
            raise ValueError(f"{self.path} has no feature settings (exported from a bare encoder): feed features")
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be (N,), got shape {audio.shape}")
        fe, step = self.features, self.chunk_frames
        step_samples = step * fe.hop_length
        state = self.init_stream_state(1)
        cache, outputs, times = None, [], []
        ctc = self.output == "log_probs"
        prev, tokens = self.blank_id, []
        for start in range(0, max(audio.size, 1), step_samples):
            t0 = time.perf_counter()
            feats, cache = fe.stream_step(audio[None, start : start + step_samples], cache)
            k = feats.shape[1]
            last = start + step_samples >= audio.size
            if k < step:
                feats = np.pad(feats, ((0, 0), (0, step - k), (0, 0)))
            out, out_len, state = self.stream_step(feats, np.array([k], dtype=np.int64), state, final=last)
            frames = out[0, : int(out_len[0])]
            if ctc:
                for t in frames.argmax(-1).tolist():
                    if t != prev and t != self.blank_id:
                        tokens.append(t)
                    prev = t
            times.append(time.perf_counter() - t0)
            outputs.append(frames)
            if ctc and on_tokens is not None:
                on_tokens(list(tokens))
            if last:
                break
        seconds = audio.size / fe.sample_rate
        r = {"output": np.concatenate(outputs), "step_ms": [t * 1000.0 for t in times],
             "chunk_ms": step_samples * 1000.0 / fe.sample_rate, "lookahead_ms": self.lookahead_ms,
             "latency_ms": self.latency_ms, "rtf": sum(times) / max(seconds, 1e-9), "seconds": seconds,
             "state_bytes": state.nbytes_per_stream()}
        if ctc:
            r["tokens"] = tokens
            if self.vocabulary is not None:
                r["text"] = self.decode(tokens)
        return r
