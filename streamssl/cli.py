"""The ``streamssl`` command.

Each subcommand is a pair of functions, ``_args_<name>(parser)`` (declares its arguments) and
``_run_<name>(args) -> int`` (does the work, returns the exit status), registered in ``COMMANDS``.
To add a subcommand, write the pair and add one row to the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence


class Command(NamedTuple):
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- demo-data -------------------------------------------------------------------------------------
def _args_demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the corpus into")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (same seed, same bytes)")
    p.add_argument("--n-train", type=int, default=160, help="training utterances (2-12 s each)")
    p.add_argument("--n-val", type=int, default=24, help="validation utterances")
    p.add_argument("--n-noise", type=int, default=6, help="noise files (6-10 s each)")


def _run_demo_data(args: argparse.Namespace) -> int:
    from streamssl.data.demo import make_demo_corpus
    from streamssl.data.manifest import load_manifest

    t0 = time.perf_counter()
    corpus = make_demo_corpus(args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                              n_noise=args.n_noise)
    dt = time.perf_counter() - t0
    for name in ("train", "val", "noise"):
        path = getattr(corpus, name)
        idx = load_manifest(path)
        print(f"{name:6s} {path}  ({len(idx)} files, {idx.total_seconds / 60:.1f} min)")
    print(f"alignments: {corpus.train_alignment}, {corpus.val_alignment}")
    print(f"wrote {corpus.root} in {dt:.1f} s")
    return 0


# -- shard -----------------------------------------------------------------------------------------
def _args_shard(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", metavar="MANIFEST... OUT_DIR", nargs="+",
                   help="manifest(s) whose audio to pack, then the directory for audio_N.tar and "
                        "tarred_audio_manifest.json (with --webdataset: OUT_DIR only)")
    p.add_argument("--webdataset", metavar="PATTERN", default=None,
                   help="index existing WebDataset-style shards (KEY.flac/.wav + optional KEY.json with text) "
                        "instead: writes OUT_DIR/tarred_audio_manifest.json, no audio is rewritten")
    p.add_argument("--target-mb", type=float, default=500.0, help="shard size to aim at, MB of 16-bit PCM")
    p.add_argument("--format", choices=("flac", "wav"), default="flac", help="member format (16-bit PCM)")
    p.add_argument("--num-shards", type=int, default=None, help="this many shards instead of --target-mb")
    p.add_argument("--seed", type=int, default=0, help="order of the members inside each shard")


def _run_shard(args: argparse.Namespace) -> int:
    from streamssl.data.shards import TARRED_MANIFEST, index_webdataset, write_shards

    t0 = time.perf_counter()
    if args.webdataset is not None:
        if len(args.paths) != 1:
            raise ValueError("with --webdataset give only OUT_DIR")
        Path(args.paths[0]).mkdir(parents=True, exist_ok=True)
        man = str(Path(args.paths[0]) / TARRED_MANIFEST)
        n, skipped = index_webdataset(args.webdataset, man, key="--webdataset")
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        print(f"{n} utterances indexed, {len(skipped)} unreadable; {time.perf_counter() - t0:.1f} s")
        print(f"train with: data.train_manifest={man} data.train_tarred_audio_filepaths={args.webdataset}")
        return 0
    if len(args.paths) < 2:
        raise ValueError("give MANIFEST(s) and OUT_DIR")
    manifests, out_dir = args.paths[:-1], args.paths[-1]
    out = write_shards(manifests if len(manifests) > 1 else manifests[0], out_dir,
                       target_mb=args.target_mb, fmt=args.format, seed=args.seed, num_shards=args.num_shards)
    for path, reason in out.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    secs = sum(out.seconds)
    print(f"{out.num_utterances} utterances ({secs / 3600:.3f} h) in {len(out.shards)} shard(s) of "
          f"{min(out.seconds):.1f}-{max(out.seconds):.1f} s; {len(out.skipped)} skipped; "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"manifest: {out.manifest}")
    print(f"train with: data.train_manifest={out.manifest} data.train_tarred_audio_filepaths={out.pattern}")
    return 0


# -- compute-stats ---------------------------------------------------------------------------------
def _args_compute_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", metavar="MANIFEST", nargs="+", help="manifest(s) to measure")
    p.add_argument("out", metavar="OUT", help="JSON file to write (mean, std, frames, feature settings)")
    p.add_argument("--config", default=None, help="recipe whose model.features settings to use (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.sub=value",
                   help="config override, e.g. --set model.features.n_mels=64 (repeatable)")
    p.add_argument("--max-hours", type=float, default=None,
                   help="use a seeded random subset of about this many hours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--batch-seconds", type=float, default=120.0)
    p.add_argument("--device", default="cpu")


def _run_compute_stats(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from streamssl.config import load_config
    from streamssl.data.manifest import load_manifest
    from streamssl.ssl.features import LogMelFeatures, compute_global_stats, save_stats

    f = OmegaConf.to_container(load_config(args.config, args.overrides).model.features, resolve=True)
    feats = LogMelFeatures(**{k: v for k, v in f.items() if k not in ("normalize", "stats")})
    index = load_manifest(args.manifest)
    max_seconds = None if args.max_hours is None else args.max_hours * 3600.0
    t0 = time.perf_counter()
    stats = compute_global_stats(index, feats, max_seconds=max_seconds, batch_seconds=args.batch_seconds,
                                 num_workers=args.num_workers, seed=args.seed, device=args.device)
    save_stats(args.out, stats)
    print(f"{stats['frames']} frames ({stats['seconds'] / 3600:.3f} h) in {time.perf_counter() - t0:.1f} s; "
          f"{stats['skipped']} file(s) skipped; wrote {args.out}")
    return 0


# -- pretrain --------------------------------------------------------------------------------------
def _args_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="recipe YAML or bundled recipe name (demo, small, small_lookahead, ...); default: demo")
    p.add_argument("--out", default="runs/demo", help="run directory; an existing checkpoint there is resumed")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def _run_pretrain(args: argparse.Namespace) -> int:
    from streamssl.config import load_config
    from streamssl.train import pretrain

    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    last = pretrain(cfg, args.out)
    _summary(last, args.out, t0, ("loss", "acc", "val_loss", "val_acc", "val_marginal_ce", "val_majority_acc"))
    return 0


def _summary(last: dict, out: str, t0: float, keys) -> None:
    out = Path(out)
    if last:
        print(f"step {last['step']}: " + ", ".join(f"{k} {last[k]:.4f}" for k in keys if k in last))
    print(f"finished in {time.perf_counter() - t0:.0f} s")
    print(f"checkpoint: {out / 'checkpoints' / 'last.pt'}")
    print(f"metrics:    {out / 'metrics.jsonl'}")
    print(f"config:     {out / 'config.yaml'}")


# -- finetune --------------------------------------------------------------------------------------
def _args_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="recipe YAML or bundled name (finetune_demo, finetune_small, finetune_large); "
                        "default: finetune_demo")
    p.add_argument("--out", default="runs/finetune_demo", help="run directory; an existing checkpoint there is resumed")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="pretraining run directory, checkpoint or exported encoder (default: random init)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def _run_finetune(args: argparse.Namespace) -> int:
    from streamssl.config import load_finetune_config
    from streamssl.train.finetuning import finetune

    cfg = load_finetune_config(args.config, args.overrides)
    explicit_context = any(o.startswith("model.encoder.att_context_size=") for o in args.overrides)
    t0 = time.perf_counter()
    last = finetune(cfg, args.out, init=args.init, context_override=explicit_context)
    _summary(last, args.out, t0, ("loss", "val_loss", "val_wer", "val_cer"))
    print(f"tokenizer:  {Path(args.out) / 'tokenizer.model'}")
    return 0


# -- transcribe ------------------------------------------------------------------------------------
def _args_transcribe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|FILE", help="fine-tuning run directory or checkpoint")
    p.add_argument("audio", nargs="*", metavar="AUDIO", help="audio files (any rate soundfile reads; resampled)")
    p.add_argument("--manifest", default=None, help="JSON-lines manifest; with `text`, WER/CER are printed")
    p.add_argument("--out", default=None, help="write JSON lines: each input line plus pred_text")
    p.add_argument("--streaming", action="store_true", help="decode chunk by chunk with the cache-aware encoder")
    p.add_argument("--att-context-size", default=None, metavar="L,R", help="context to decode with (a trained one)")
    p.add_argument("--chunks-per-step", type=int, default=1, help="encoder chunks per streaming step")
    p.add_argument("--batch-seconds", type=float, default=120.0, help="audio per offline batch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--onnx", action="store_true",
                   help="--model is a graph from `streamssl export --onnx`: stream it with onnxruntime")


def _run_transcribe(args: argparse.Namespace) -> int:
    from streamssl.transcribe import transcribe_command

    return transcribe_command(args)


# -- probe -----------------------------------------------------------------------------------------
def _args_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, metavar="RUN",
                   help="pretraining run directory, checkpoint or exported encoder (as for finetune --init)")
    p.add_argument("--train-manifest", required=True, help="transcribed manifest the probes train on")
    p.add_argument("--test-manifest", required=True, help="transcribed manifest they are scored on (held-out voices)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="probe seeds (one probe per seed)")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps per probe")
    p.add_argument("--vocab-size", type=int, default=128, help="BPE pieces of the probes' CTC vocabulary")
    p.add_argument("--only", nargs="+", choices=("encoder", "random", "logmel"), default=None,
                   help="representations to probe (default: all three)")
    p.add_argument("--layer", type=int, default=None,
                   help="probe this conformer block's output (1..n_layers; 0: the subsampling) of both encoders "
                        "instead of the last")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _run_probe(args: argparse.Namespace) -> int:
    import json

    import torch

    from streamssl.asr.probe import REPRESENTATIONS, compare_representations

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    t0 = time.perf_counter()
    res = compare_representations(args.init, args.train_manifest, args.test_manifest, seeds=args.seeds,
                                  vocab_size=args.vocab_size, representations=args.only or REPRESENTATIONS,
                                  layer=args.layer, steps=args.steps, log=lambda line: print(line, file=sys.stderr, flush=True))
    label = {"encoder": f"pretrained ({args.init})", "random": "random-init encoder",
             "logmel": "8 stacked log-mel frames"}
    print(f"frozen probe, test CER / WER (%), seeds {' '.join(map(str, args.seeds))}; {time.perf_counter() - t0:.0f} s")
    for rep, rows in res.items():
        cer = " ".join(f"{r['cer']:.1f}" for r in rows)
        wer = " ".join(f"{r['wer']:.1f}" for r in rows)
        print(f"  {label[rep]:40s} CER {cer}   WER {wer}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


# -- plot ------------------------------------------------------------------------------------------
def _args_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining or fine-tuning run directory")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")


def _run_plot(args: argparse.Namespace) -> int:
    from streamssl.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


# -- export-encoder --------------------------------------------------------------------------------
def _args_export_encoder(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="pretraining checkpoint (<run>/checkpoints/last.pt)")
    p.add_argument("out", metavar="OUT", help="encoder file to write (load with streamssl.load_encoder)")


def _run_export_encoder(args: argparse.Namespace) -> int:
    from streamssl.export import export_encoder, load_encoder

    path = export_encoder(args.checkpoint, args.out)
    enc = load_encoder(path)
    n = sum(p.numel() for p in enc.parameters())
    print(f"wrote {path}: FastConformerEncoder d_model={enc.d_model}, {enc.n_layers} layers, "
          f"{n / 1e6:.2f} M parameters, att_context_size={list(enc.att_context_size)}")
    return 0


# -- export-onnx -----------------------------------------------------------------------------------
def _args_export_onnx(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|FILE",
                   help="fine-tuned run/checkpoint (graph outputs CTC log-probs), pretraining checkpoint or exported encoder")
    p.add_argument("out", metavar="OUT.onnx", help="ONNX file to write (run it with streamssl.runtime)")
    p.add_argument("--att-context-size", default=None, metavar="L,R", help="context to export (a trained one)")
    p.add_argument("--chunks-per-step", type=int, default=1, help="attention chunks per step (the graph's fixed chunk)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights (onnxruntime dynamic quantisation): smaller and faster, not bit-equal to PyTorch")
    p.add_argument("--int4", action="store_true",
                   help="4-bit weights only (MatMulNBits, blocks of 16): 4.4x smaller, not bit-equal to PyTorch")
    p.add_argument("--int8w", action="store_true",
                   help="8-bit weights only (MatMulNBits, blocks of 32): 3x smaller, not bit-equal to PyTorch")


_QUANT_FLAGS = (("--int8", "int8"), ("--int4", "int4"), ("--int8w", "int8w"))


def _quantize_flag(args: argparse.Namespace) -> str | None:
    on = [(flag, q) for flag, q in _QUANT_FLAGS if getattr(args, flag[2:])]
    if len(on) > 1:
        raise ValueError(f"{' and '.join(f for f, _ in on)}: choose one quantisation")
    return on[0][1] if on else None


def _run_export_onnx(args: argparse.Namespace) -> int:
    from streamssl.onnx_export import export_stream_onnx
    from streamssl.runtime import OnnxStreamingEncoder

    pair = None
    if args.att_context_size:
        try:
            pair = [int(v) for v in args.att_context_size.split(",")]
        except ValueError:
            raise ValueError(f"--att-context-size: expected L,R, got {args.att_context_size!r}") from None
    path = export_stream_onnx(args.model, args.out, att_context_size=pair, chunks_per_step=args.chunks_per_step,
                              quantize=_quantize_flag(args))
    m = OnnxStreamingEncoder(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {m.output}, att_context_size={list(m.att_context_size)} "
          f"({m.att_context_style}), {m.chunk_frames} feature frames ({m.chunk_frames * 10} ms) per step, "
          f"state {m.init_stream_state(1).nbytes_per_stream() / 1e6:.2f} MB per stream"
          + (" at the start (left = -1: keys and values grow with the stream)" if m.att_context_size[0] < 0 else ""))
    return 0


# -- export (one entry for both formats) -------------------------------------------------------------
def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", action="store_true",
                   help="write the streaming step as an ONNX graph (else: the encoder as a PyTorch file for "
                        "--init and streamssl.load_encoder)")
    _args_export_onnx(p)


def _run_export(args: argparse.Namespace) -> int:
    from streamssl.asr.model import resolve_model_path

    if args.onnx:
        return _run_export_onnx(args)
    onnx_only = [f for f, on in (*((f, getattr(args, f[2:])) for f, _ in _QUANT_FLAGS),
                                 ("--att-context-size", args.att_context_size),
                                 ("--chunks-per-step", args.chunks_per_step != 1)) if on]
    if onnx_only:
        raise ValueError(f"{', '.join(onnx_only)}: ONNX export options; add --onnx")
    args.checkpoint = str(resolve_model_path(args.model))
    return _run_export_encoder(args)


# -- stream ----------------------------------------------------------------------------------------
def _args_stream(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="exported encoder or pretraining checkpoint")
    p.add_argument("audio", metavar="AUDIO", help="audio file (any rate soundfile reads; resampled)")
    p.add_argument("--att-context-size", default=None, metavar="L,R",
                   help="context to stream with (one of the trained ones); default: the first")
    p.add_argument("--chunks-per-step", type=int, default=1, help="encoder chunks fed per step")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: as on a device)")
    p.add_argument("--onnx", action="store_true",
                   help="CKPT is a graph from `streamssl export --onnx`: run it with onnxruntime (streamssl.runtime)")


def _run_stream(args: argparse.Namespace) -> int:
    if args.onnx:
        return _run_stream_onnx(args)
    import torch

    from streamssl.data.audio import load_audio
    from streamssl.export import load_encoder
    from streamssl.stream import stream_audio

    torch.set_num_threads(args.threads)
    enc, feats = load_encoder(args.checkpoint, with_features=True)
    if args.att_context_size:
        try:
            pair = [int(v) for v in args.att_context_size.split(",")]
        except ValueError:
            raise ValueError(f"--att-context-size: expected L,R, got {args.att_context_size!r}") from None
        enc.set_default_att_context_size(pair)
    audio = torch.from_numpy(load_audio(args.audio, sample_rate=feats.sample_rate))
    r = stream_audio(enc, feats, audio, chunks_per_step=args.chunks_per_step)
    _print_stream_report(args, r, f"att_context_size={list(enc.att_context_size)} ({enc.att_context_style})", "")
    print(f"encoder frames: {r['output'].shape[0]}; streaming vs offline max |diff| = {r['max_abs_diff']:.2e}")
    return 0


def _print_stream_report(args: argparse.Namespace, r: dict, context: str, state_note: str) -> None:
    """The latency/compute/RTF lines both `stream` paths print."""
    steps = sorted(r["step_ms"])
    p95 = steps[min(len(steps) - 1, int(0.95 * len(steps)))] if steps else float("nan")
    print(f"audio: {args.audio} ({r['seconds']:.2f} s), {context}")
    print(f"chunk: {r['chunk_ms']:.0f} ms of audio per step; algorithmic lookahead {r['lookahead_ms']:.0f} ms, "
          f"latency {r['latency_ms']:.0f} ms")
    print(f"compute per step: mean {sum(steps) / max(len(steps), 1):.2f} ms, p95 {p95:.2f} ms over {len(steps)} steps "
          f"({args.threads} thread(s)){state_note}")
    print(f"real-time factor: {r['rtf']:.3f}")


def _run_stream_onnx(args: argparse.Namespace) -> int:
    from streamssl.data.audio import load_audio
    from streamssl.runtime import OnnxStreamingEncoder

    if args.att_context_size or args.chunks_per_step != 1:
        raise ValueError("--onnx: the context and chunk are fixed at export (streamssl export --onnx --att-context-size, "
                         "--chunks-per-step)")
    m = OnnxStreamingEncoder(args.checkpoint, threads=args.threads)
    if m.features is None:
        raise ValueError(f"{args.checkpoint}: exported from a bare encoder without feature settings; "
                         "export a checkpoint or exported encoder file instead")
    r = m.stream(load_audio(args.audio, sample_rate=m.features.sample_rate))
    _print_stream_report(args, r, f"att_context_size={list(m.att_context_size)} ({m.att_context_style}), onnxruntime",
                         f"; stream state {r['state_bytes'] / 1e6:.2f} MB")
    print(f"output frames: {r['output'].shape[0]}")
    if "tokens" in r:
        print(f"transcript: {r.get('text', r['tokens'])}")
    return 0


# -- info ------------------------------------------------------------------------------------------
def _args_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="recipe to describe (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")


def _run_info(args: argparse.Namespace) -> int:
    import torch

    import streamssl
    from streamssl import ops
    from streamssl.config import load_config, resolve_recipe
    from streamssl.nn.encoder import FastConformerEncoder

    print(f"streamssl {streamssl.__version__}, torch {torch.__version__}, "
          f"CUDA available: {torch.cuda.is_available()}")
    print(f"ops backend: {ops.backend()} (" + ", ".join(f"{d}: {b}" for d, b in ops.device_backends().items()) + ")")
    cfg = load_config(args.config, args.overrides)
    from omegaconf import OmegaConf

    enc_cfg = OmegaConf.to_container(cfg.model.encoder, resolve=True)
    enc = FastConformerEncoder(**enc_cfg)
    n = sum(p.numel() for p in enc.parameters())
    print(f"recipe: {resolve_recipe(args.config)}; encoder {n / 1e6:.2f} M parameters")
    for pair in enc.att_context_sizes:
        enc.set_default_att_context_size(list(pair))
        print(f"  att_context_size={list(pair)} ({enc.att_context_style}): chunk {enc.chunk_ms():.0f} ms, "
              f"lookahead {enc.lookahead_ms():.0f} ms, algorithmic latency {enc.latency_ms():.0f} ms")
    return 0


# -- table -----------------------------------------------------------------------------------------
COMMANDS: dict[str, Command] = {
    "pretrain": Command("NEST/BEST-RQ pretraining of a streaming encoder (resumes from --out)",
                        _args_pretrain, _run_pretrain),
    "finetune": Command("fine-tune a (pretrained) streaming encoder with a CTC head on transcribed audio",
                        _args_finetune, _run_finetune),
    "transcribe": Command("transcribe files or a manifest with a fine-tuned model (offline or streaming); WER/CER",
                          _args_transcribe, _run_transcribe),
    "probe": Command("frozen-encoder probe: a pretrained encoder vs a random one vs log-mel frames (CER/WER)",
                     _args_probe, _run_probe),
    "plot": Command("training and validation curves of a run as PNG files", _args_plot, _run_plot),
    "export": Command("export a model: --onnx for the streaming step as ONNX, else the encoder for --init",
                      _args_export, _run_export),
    "export-encoder": Command("write the encoder of a pretraining checkpoint for fine-tuning (= export)",
                              _args_export_encoder, _run_export_encoder),
    "export-onnx": Command("write the streaming step (with its CTC head, if any) as one ONNX graph (= export --onnx)",
                           _args_export_onnx, _run_export_onnx),
    "stream": Command("stream an audio file chunk by chunk through an encoder; latency and RTF",
                      _args_stream, _run_stream),
    "info": Command("ops backend, and the chunk size / lookahead / latency of a recipe", _args_info, _run_info),
    "demo-data": Command("write the small synthetic demo corpus", _args_demo_data, _run_demo_data),
    "shard": Command("pack a manifest's audio into duration-balanced tar shards (NeMo's tarred layout)",
                     _args_shard, _run_shard),
    "compute-stats": Command("global log-mel mean/std of a manifest (for normalize='global')",
                             _args_compute_stats, _run_compute_stats),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamssl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamssl`` console script; returns the exit status."""
    from streamssl.checkpoint import CheckpointError
    from streamssl.data.audio import AudioReadError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError, ImportError, AudioReadError, CheckpointError) as e:
        # These errors name the argument, file or line; a traceback would only bury that.
        print(f"streamssl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
