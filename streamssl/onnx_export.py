"""Export the encoder's streaming step as one ONNX graph with the stream state as named tensors.

``export_stream_onnx(model_or_path, out_path)`` writes a graph that does what
``FastConformerEncoder.stream_step`` does for one fixed chunk of ``stream_chunk_frames() *
chunks_per_step`` feature frames, for any batch size, with standard ONNX ops only (the fused
conv op is written out as its reference composition: pointwise -> GLU -> depthwise Conv ->
LayerNorm -> SiLU -> pointwise). ``streamssl.runtime.OnnxStreamingEncoder`` runs it.

Graph inputs (B = batch, dynamic; c = encoder frames per step; N = cached encoder frames):

* ``chunk`` (B, T, F) float32 features, ``chunk_lengths`` (B,) int64 valid frames in the chunk;
* the state: ``feat_lengths`` (B,) int64 feature frames received per row, ``processed`` (B,)
  int64 encoder frames pushed through the layers per row, ``sub{s}`` (B, C_s, 1, F_s) each
  subsampling stage's last input frame, ``layer{i}.k`` / ``layer{i}.v`` (B, H, N, d_head) keys and
  values of the left context, ``layer{i}.conv`` (B, K-1, D) the conv module's cache.

Outputs: ``encoded`` (B, c, D) (or ``log_probs`` (B, c, V+1) for a model with a CTC head),
``out_lengths`` (B,) int64, then ``next.<name>`` for every state input.

Fixed-size state: with a left context of L frames the key/value caches hold exactly L frames
(slots before the start of a stream are masked, so a fresh state is all zeros); with an unlimited
left context (L = -1) they grow by c frames per step (a dynamic axis). Positions enter only as
distances, so the projected relative-position table is a constant of the graph for a fixed L and
is computed in the graph from the cache length for L = -1.

Flushing: the chunked_limited style (every bundled recipe) and ``regular`` with right = 0 never
queue frames for lookahead, so a row's frames all come out in the step where it ends; ``regular``
with right > 0 is refused.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamssl.nn.attention import context_mask, rel_position_sinusoid
from streamssl.nn.encoder import FastConformerEncoder

FORMAT = "streamssl-onnx-stream"
VERSION = 1
OPSET = 17
# quantize= choices: float32, dynamic int8 (MatMulInteger), weight-only 4 / 8 bit (MatMulNBits).
# Weight-only: (bits, input channels per block, each block with a float scale and a zero point).
# int4 uses blocks of 16: on a fine-tuned d 96 model blocks of 32 cost 5.4 WER points against
# float32 and blocks of 16 1.6, for 5-15 % more time per step (bench/RESULTS.md).
NBITS = {"int4": (4, 16), "int8w": (8, 32)}
QUANTIZE = (None, "int8", *NBITS)
NBITS_ACCURACY_LEVEL = 4  # MatMulNBits: activations quantised to int8 per block inside the kernel


class OnnxExportError(ValueError):
    """The model (or the requested context) cannot be exported as a streaming graph."""


def _rel_shift(x: torch.Tensor, n_q: int, n_k: torch.Tensor | int, H: int) -> torch.Tensor:
    """(B, H, n_q, n_q + n_k - 1) -> (B, H, n_q, n_k): out[..., a, b] = x[..., a, b + n_q - 1 - a].

    The flat-view form of ``attention.rel_shift`` (reshape and slice, no strided views): element
    (a, b) sits at flat index (n_q - 1) + a * (L - 1) + b of the row-major (n_q, L) block. With a
    static n_k the reshapes use constant shapes (no shape arithmetic in the graph).
    """
    if n_q == 1:
        return x
    L = n_q + n_k - 1
    flat = x.reshape(-1, H, n_q * L)[:, :, n_q - 1 : n_q - 1 + n_q * (L - 1)]
    return flat.reshape(-1, H, n_q, L - 1)[:, :, :, :n_k]


def _sinusoid(d_hi: torch.Tensor, length: torch.Tensor, d_model: int) -> torch.Tensor:
    """In-graph ``rel_position_sinusoid(d_hi, length, d_model)`` (even d_model)."""
    d = (d_hi - torch.arange(length, dtype=torch.int64)).to(torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    ang = d * inv_freq
    return torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(-1, d_model)


class StreamStepGraph(nn.Module):
    """The stream step with a fixed chunk and an explicit, fixed-layout state (what gets exported).

    Reads the weights of ``encoder`` (and ``head``, a ``CTCHead``) without copying them.
    """

    def __init__(self, encoder: FastConformerEncoder, head: nn.Module | None = None, chunks_per_step: int = 1):
        super().__init__()
        left, right = encoder.att_context_size
        style = encoder.att_context_style
        if right < 0:
            raise OnnxExportError(f"att_context_size={[left, right]} has right = -1: it cannot stream")
        if style == "regular" and right > 0:
            raise OnnxExportError(
                f"att_context_size={[left, right]} with style 'regular' queues frames for lookahead at every layer; "
                "only chunked_limited contexts (and regular with right = 0) export to ONNX"
            )
        if encoder.d_model % 2:
            raise OnnxExportError(f"d_model must be even for the relative-position table, got {encoder.d_model}")
        # The encoder itself is a plain attribute (its extra state, a dict, would break tracing);
        # its weights are registered through its subsampling and layers.
        object.__setattr__(self, "encoder", encoder)
        self.subsampling, self.layers, self.head = encoder.subsampling, encoder.layers, head
        self.left, self.right, self.style = left, right, style
        self.chunk_frames = encoder.stream_chunk_frames() * chunks_per_step  # feature frames per step
        self.c = self.chunk_frames // encoder.subsampling_factor  # encoder frames per step
        self.n_cache = left  # -1: unlimited (dynamic)
        c, D = self.c, encoder.d_model
        if left >= 0:
            n_k = left + c
            # Query a sits at n_cache + a, key slot j at j (relative to the cache start, which is
            # aligned to the attention chunk because left is a multiple of it).
            self.register_buffer("ctx_mask", context_mask(left, c, 0, n_k, (left, right), style), persistent=False)
            with torch.no_grad():
                tables = []
                for block in encoder.layers:
                    a = block.attn
                    pos = a.project_pos(rel_position_sinusoid(n_k - 1, n_k + c - 1, D))  # (L, D)
                    tables.append(pos.view(-1, a.n_heads, a.d_head).permute(1, 2, 0).contiguous())  # (H, dh, L)
            self.register_buffer("pos_tables", torch.stack(tables), persistent=False)
        else:
            self.register_buffer("new_mask", context_mask(0, c, 0, c, (left, right), style), persistent=False)

    # ---- state layout ----------------------------------------------------------------------------

    def state_spec(self) -> list[tuple[str, tuple]]:
        """[(name, shape)] of the state tensors; "B" marks the batch axis, "N" the growing cache axis."""
        enc = self.encoder
        spec = [("feat_lengths", ("B",)), ("processed", ("B",))]
        for s, f in enumerate(enc.subsampling.stage_freqs):
            spec.append((f"sub{s}", ("B", 1 if s == 0 else enc.subsampling.channels, 1, f)))
        n = "N" if self.n_cache < 0 else self.n_cache
        for i, block in enumerate(enc.layers):
            if n != 0:
                spec.append((f"layer{i}.k", ("B", block.attn.n_heads, n, block.attn.d_head)))
                spec.append((f"layer{i}.v", ("B", block.attn.n_heads, n, block.attn.d_head)))
            spec.append((f"layer{i}.conv", ("B", block.conv.kernel_size - 1, enc.d_model)))
        return spec

    def init_state(self, batch_size: int) -> list[torch.Tensor]:
        out = []
        for name, shape in self.state_spec():
            shape = tuple(batch_size if d == "B" else 0 if d == "N" else d for d in shape)
            dtype = torch.int64 if name in ("feat_lengths", "processed") else torch.float32
            out.append(torch.zeros(shape, dtype=dtype))
        return out

    # ---- the step --------------------------------------------------------------------------------

    def _subsample(self, chunk, chunk_lengths, caches):
        sub = self.encoder.subsampling
        x = chunk.unsqueeze(1)
        lengths = chunk_lengths
        new = []
        for s in range(len(sub.convs)):
            T = self.chunk_frames >> s  # static sizes: no shape arithmetic in the graph
            valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
            x = torch.cat([caches[s], x * valid[:, None, :, None].to(x.dtype)], dim=2)
            new.append(x[:, :, -1:])
            x = sub._stage(s, x, 0)
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
        # Frames as rows of a 2-D (B * c, D) matrix from here on: every Linear is then one Gemm with
        # its bias fused (3-D MatMul + Add is two kernels in onnxruntime).
        return sub.out(x.permute(0, 2, 1, 3).reshape(-1, sub.out.in_features)), new

    def _conv(self, conv, x, cache):
        h = F.glu(conv.pointwise1(x), dim=-1).reshape(-1, self.c, conv.d_model)
        hc = torch.cat([cache, h], dim=1)
        new_cache = hc[:, 1 - conv.kernel_size :]
        y = F.conv1d(hc.transpose(1, 2), conv.dw_weight.unsqueeze(1), conv.dw_bias, groups=conv.d_model)
        y = y.transpose(1, 2).reshape(-1, conv.d_model)
        y = F.silu(F.layer_norm(y, (conv.d_model,), conv.ln_weight, conv.ln_bias, conv.eps))
        return conv.pointwise2(y), new_cache

    def _attend(self, i, block, x, k, v, key_ok):
        a = block.attn
        n_q, D = self.c, self.encoder.d_model
        H, dh = a.n_heads, a.d_head
        n_k = self.n_cache + n_q if self.n_cache >= 0 else k.shape[2]
        q = a.linear_q(x).reshape(-1, n_q, H, dh).transpose(1, 2)
        if self.n_cache >= 0:
            p = self.pos_tables[i]  # (H, dh, L)
            allowed = self.ctx_mask.unsqueeze(0) & key_ok.unsqueeze(1)  # (B, n_q, n_k)
        else:
            n_cache = n_k - n_q
            pos = a.project_pos(_sinusoid(n_k - 1, n_k + n_q - 1, D))
            p = pos.view(-1, H, dh).permute(1, 2, 0)
            cached = torch.ones(n_q, n_cache, dtype=torch.bool)
            allowed = torch.cat([cached, self.new_mask], dim=1).unsqueeze(0) & key_ok.unsqueeze(1)
        ac = torch.matmul(q + a.pos_bias_u.unsqueeze(1), k.transpose(-2, -1))
        bd = _rel_shift(torch.matmul(q + a.pos_bias_v.unsqueeze(1), p), n_q, n_k, H)
        scores = (ac + bd) * (1.0 / math.sqrt(dh))
        allowed = allowed.unsqueeze(1)
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        w = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
        out = torch.matmul(w, v).transpose(1, 2).reshape(-1, D)
        return a.linear_out(out)

    def forward(self, chunk, chunk_lengths, feat_lengths, processed, *state):
        enc = self.encoder
        n_sub = len(enc.subsampling.convs)
        sub_caches, rest = state[:n_sub], state[n_sub:]
        x, new_sub = self._subsample(chunk, chunk_lengths, sub_caches)
        feat_lengths = feat_lengths + chunk_lengths
        f = enc.subsampling_factor
        lengths = torch.div(feat_lengths + (f - 1), f, rounding_mode="floor")
        new_layers = []
        pos_k = None
        it = iter(rest)
        for i, block in enumerate(enc.layers):
            if self.n_cache != 0:
                k_cache, v_cache = next(it), next(it)
            conv_cache = next(it)
            h = block.pre_attention(x)
            a = block.attn
            hn = block.norm_att(h)
            k_new = a.linear_k(hn).reshape(-1, self.c, a.n_heads, a.d_head).transpose(1, 2)
            v_new = a.linear_v(hn).reshape(-1, self.c, a.n_heads, a.d_head).transpose(1, 2)
            if self.n_cache != 0:
                k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
            else:
                k, v = k_new, v_new
            if pos_k is None:  # absolute position of every key slot, per row (the same for all layers)
                n_k = self.n_cache + self.c if self.n_cache >= 0 else k.shape[2]
                pos_k = processed.unsqueeze(1) - (n_k - self.c) + torch.arange(n_k).unsqueeze(0)
                key_ok = (pos_k >= 0) & (pos_k < lengths.unsqueeze(1))
            x = h + self._attend(i, block, hn, k, v, key_ok)
            cv, conv_cache = self._conv(block.conv, block.norm_conv(x), conv_cache)
            x = block.post_conv(x + cv)
            if self.n_cache > 0:
                new_layers += [k[:, :, self.c :], v[:, :, self.c :]]
            elif self.n_cache < 0:
                new_layers += [k, v]
            new_layers.append(conv_cache)
        x = x.reshape(-1, self.c, enc.d_model)
        out_lengths = torch.clamp(lengths - processed, 0, self.c)
        valid = torch.arange(self.c).unsqueeze(0) < out_lengths.unsqueeze(1)
        y = x * valid.unsqueeze(-1).to(x.dtype)
        if self.head is not None:
            y = F.log_softmax(self.head.proj(y), dim=-1)
        return (y, out_lengths, feat_lengths, processed + self.c, *new_sub, *new_layers)


def _load(model_or_path):
    """-> (encoder, features or None, head or None, tokenizer or None)."""
    if isinstance(model_or_path, FastConformerEncoder):
        return model_or_path, None, None, None
    from streamssl.asr.model import CTCModel

    if isinstance(model_or_path, CTCModel):
        return model_or_path.encoder, model_or_path.features, model_or_path.head, None
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise OnnxExportError(
            f"model_or_path must be a FastConformerEncoder, a CTCModel or a path, got {type(model_or_path).__name__}"
        )
    from streamssl.asr.model import FORMAT as CTC_FORMAT, load_ctc_model, resolve_model_path
    from streamssl.checkpoint import load_checkpoint

    p = resolve_model_path(model_or_path)
    if load_checkpoint(p).get("format") == CTC_FORMAT:
        model, tok = load_ctc_model(p)
        return model.encoder, model.features, model.head, tok
    from streamssl.export import load_encoder

    enc, feats = load_encoder(p, with_features=True)
    return enc, feats, None, None


def _features_meta(features) -> dict | None:
    if features is None:
        return None
    if features.normalize == "per_utterance":
        raise OnnxExportError("features with normalize='per_utterance' cannot stream")
    meta = features.config()
    meta["normalize"] = features.normalize
    meta["mean"] = [float(v) for v in features.mean.tolist()]
    meta["std"] = [float(v) for v in features.std.tolist()]
    return meta


def export_stream_onnx(model_or_path, out_path, att_context_size=None, chunks_per_step: int = 1,
                       quantize: str | None = None) -> Path:
    """Write the streaming step of an encoder (or of a fine-tuned CTC model) as one ONNX graph.

    Args:
        model_or_path: a ``FastConformerEncoder``, a ``CTCModel``, or a path (run directory,
            pretraining checkpoint, exported encoder or fine-tuned model). With a CTC head the graph
            outputs log-probabilities instead of encoder frames.
        out_path: the .onnx file to write (weights inside).
        att_context_size: (left, right) to export (one the model allows); default the model's.
        chunks_per_step: attention chunks per step (the graph's chunk is fixed:
            ``stream_chunk_frames() * chunks_per_step`` feature frames).
        quantize: None (float32, equal to PyTorch to ~1e-6), "int8": onnxruntime dynamic
            quantisation of every MatMul/Gemm weight (MatMulInteger; the activations are
            quantised by separate ops at run time), or weight-only block quantisation of every
            Linear to the ``MatMulNBits`` contrib op: "int4" (4-bit, blocks of 16 input channels)
            or "int8w" (8-bit, blocks of 32), each block with a float scale and a zero point
            (``NBITS``; the kernel quantises activations to int8 per block, accuracy_level 4).
            Every quantisation makes outputs no longer equal to PyTorch's: measure the WER change
            for your model.
    Returns:
        ``Path(out_path)``. Metadata (context, chunk, state layout, feature settings with global
        statistics, vocabulary) is stored in the model's ``metadata_props``.
    """
    import onnx  # noqa: F401  (a clear ImportError before any work)

    if quantize not in QUANTIZE:
        raise OnnxExportError(f"quantize must be one of {', '.join(map(repr, QUANTIZE))}, got {quantize!r}")
    if isinstance(chunks_per_step, bool) or not isinstance(chunks_per_step, int) or chunks_per_step < 1:
        raise OnnxExportError(f"chunks_per_step must be an int >= 1, got {chunks_per_step!r}")
    enc, features, head, tok = _load(model_or_path)
    saved_ctx, saved_training = enc.att_context_size, enc.training
    try:
        if att_context_size is not None:
            enc.set_default_att_context_size(att_context_size)
        enc.eval()
        path = _export(enc, features, head, tok, Path(out_path), chunks_per_step)
    finally:
        enc.set_default_att_context_size(saved_ctx)
        enc.train(saved_training)
    if quantize == "int8":
        _quantize_int8(path)
    elif quantize in NBITS:
        _quantize_nbits(path, quantize)
    return path


def _quantize_int8(path: Path) -> None:
    """Dynamic int8 quantisation of the MatMul/Gemm weights in place (metadata kept)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    tmp = path.with_name(path.name + f".int8tmp{os.getpid()}")
    try:
        logging.disable(logging.WARNING)  # its advice to run shape pre-processing is for CNNs
        try:
            quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {**meta, "quantize": "int8"})
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _gemm_to_matmul(model) -> int:
    """Rewrite every Gemm with a constant weight as MatMul(x, W as (K, N)) (+ Add bias), in place.

    ``MatMulNBitsQuantizer`` quantises only MatMul; the float32 graph keeps its Gemm (one kernel
    with the bias). Returns the number of rewritten nodes.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    nodes, done = [], 0
    for n in g.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if (n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in inits or a.get("transA", 0)
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if a.get("transB", 0):
            w = w.T
        w_name = n.input[1] + ".KxN"
        g.initializer.append(numpy_helper.from_array(w.copy(), w_name))
        has_bias = len(n.input) > 2 and n.input[2] != ""
        mm_out = n.output[0] + ".matmul" if has_bias else n.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=n.name + ".matmul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + ".bias"))
        uses[n.input[1]] -= 1
        done += 1
    g.ClearField("node")
    g.node.extend(nodes)
    dead = [t for t in g.initializer if uses.get(t.name, 1) == 0]
    for t in dead:
        g.initializer.remove(t)
    return done


def _fold_nbits_bias(model) -> int:
    """MatMulNBits -> Add(constant (N,) bias) becomes one MatMulNBits with its bias input (in place)."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    drop, done = set(), 0
    for n in g.node:
        if n.op_type != "MatMulNBits" or n.output[0] in graph_outputs:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = [i for i in add.input if i != n.output[0]]
        N = next(onnx.helper.get_attribute_value(x) for x in n.attribute if x.name == "N")
        if len(bias) != 1 or bias[0] not in inits or tuple(numpy_helper.to_array(inits[bias[0]]).shape) != (N,):
            continue
        ins = list(n.input) + [""] * (5 - len(n.input))  # A, B, scales, zero_points, g_idx, bias
        del n.input[:]
        n.input.extend(ins[:5] + [bias[0]])
        n.output[0] = add.output[0]
        drop.add(id(add))
        done += 1
    keep = [n for n in g.node if id(n) not in drop]
    g.ClearField("node")
    g.node.extend(keep)
    return done


def _quantize_nbits(path: Path, quantize: str, block_size: int | None = None,
                    accuracy_level: int = NBITS_ACCURACY_LEVEL, symmetric: bool = False) -> None:
    """Weight-only block quantisation of the Linear weights to MatMulNBits, in place (metadata kept)."""
    import logging

    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # onnxruntime >= 1.23 needs the onnx_ir package for it
        raise ImportError(f"quantize={quantize!r} needs onnxruntime's MatMulNBitsQuantizer ({e}): "
                          "pip install 'streamssl[deploy]'") from e
    bits, default_block = NBITS[quantize]
    block_size = block_size or default_block
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    _gemm_to_matmul(model)
    logging.disable(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    model = q.model.model
    n_q = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    if n_q == 0:
        raise OnnxExportError(f"quantize={quantize!r}: no weight was quantised")
    _fold_nbits_bias(model)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**meta, "quantize": quantize,
                                        "quantize_block_size": str(block_size),
                                        "quantize_accuracy_level": str(accuracy_level),
                                        "quantize_symmetric": str(symmetric).lower()})
    tmp = path.with_name(path.name + f".nbitstmp{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _export(enc, features, head, tok, out_path: Path, chunks_per_step: int) -> Path:
    import onnx

    if next(enc.parameters()).dtype != torch.float32:
        raise OnnxExportError(f"only float32 models export, got {next(enc.parameters()).dtype}")
    graph = StreamStepGraph(enc, head, chunks_per_step).cpu().eval()
    spec = graph.state_spec()
    B = 2
    chunk = torch.randn(B, graph.chunk_frames, enc.feat_in)
    lengths = torch.full((B,), graph.chunk_frames, dtype=torch.int64)
    state = graph.init_state(B)
    if graph.n_cache < 0:  # trace with a non-empty growing cache so its length stays symbolic
        state = [torch.zeros(*t.shape[:2], 2 * graph.c, t.shape[3]) if n.endswith((".k", ".v")) else t
                 for (n, _), t in zip(spec, state)]
    names = [n for n, _ in spec]
    out_name = "log_probs" if head is not None else "encoded"
    input_names = ["chunk", "chunk_lengths", *names]
    output_names = [out_name, "out_lengths", *("next." + n for n in names)]
    dyn = {"chunk": {0: "B"}, "chunk_lengths": {0: "B"}, out_name: {0: "B"}, "out_lengths": {0: "B"}}
    for name, shape in spec:
        axes = {ax: ("B" if d == "B" else "N_in") for ax, d in enumerate(shape) if d in ("B", "N")}
        dyn[name] = axes
        dyn["next." + name] = {ax: ("B" if v == "B" else "N_out") for ax, v in axes.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (chunk, lengths, *state), str(tmp), input_names=input_names,
                              output_names=output_names, dynamic_axes=dyn, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        _finish(onnx.load(str(tmp)), tmp, out_path, enc, graph, spec, out_name, features, head, tok, chunks_per_step)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _finish(model, tmp, out_path, enc, graph, spec, out_name, features, head, tok, chunks_per_step) -> None:
    import onnx

    left, right = enc.att_context_size
    meta = {
        "format": FORMAT, "version": str(VERSION),
        "att_context_size": json.dumps([left, right]), "att_context_style": enc.att_context_style,
        "chunks_per_step": str(chunks_per_step), "chunk_frames": str(graph.chunk_frames),
        "step_frames": str(enc.stream_chunk_frames()),
        "encoder_frames_per_step": str(graph.c), "subsampling_factor": str(enc.subsampling_factor),
        "feat_in": str(enc.feat_in), "d_model": str(enc.d_model), "n_layers": str(enc.n_layers),
        "lookahead_ms": str(enc.lookahead_ms()), "latency_ms": str(enc.latency_ms()),
        "output": out_name,
        "state": json.dumps([[n, list(s)] for n, s in spec]),
    }
    fm = _features_meta(features)
    if fm is not None:
        meta["features"] = json.dumps(fm)
    if head is not None:
        meta["blank_id"] = str(head.blank_id)
        meta["vocab_size"] = str(head.vocab_size)
    if tok is not None:
        meta["vocabulary"] = json.dumps(tok.pieces())
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    os.replace(tmp, out_path)
