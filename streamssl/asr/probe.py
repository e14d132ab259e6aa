"""Frozen-representation probe: how much of the transcript a fixed encoder's frames still carry.

A small MLP + CTC is trained on frozen frames of a transcribed training set and scored (CER, WER)
on a held-out set. The same probe, budget and seed serve every representation, so the numbers
compare what the representations keep, not the probes:

* ``encoder``: a (pretrained) ``FastConformerEncoder``'s output, eval mode, offline pass;
* ``logmel``: the 8 log-mel frames an encoder frame covers, stacked (640 dims): the input itself
  at the encoder's frame rate, the bar any useful encoder must clear;
* a random-init encoder is just ``encoder`` with fresh weights.

Each dimension is standardised with the training set's mean and std before the probe, so
representations on different scales get the same optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .ctc import ctc_loss, greedy_tokens
from .metrics import ErrorCounts
from .tokenizer import Tokenizer


@dataclass
class ProbeSet:
    """Frozen frames and transcripts: ``frames[i]`` (T'_i, D) float32, ``texts[i]`` str."""

    frames: list[torch.Tensor]
    texts: list[str]


@torch.no_grad()
def extract_frames(index, features, encoder=None, stack: int = 8, batch_seconds: float = 60.0,
                   layer: int | None = None) -> ProbeSet:
    """Frames of every utterance of a transcribed manifest index (loaded with ``keep_text=True``).

    Args:
        index: ManifestIndex with texts.
        features: LogMelFeatures (eval mode; dither off).
        encoder: FastConformerEncoder (eval mode), or None for stacked log-mel frames.
        stack: log-mel frames per output frame when ``encoder`` is None (the subsampling factor).
        layer: with an encoder, the output of conformer block ``layer`` (1..n_layers; 0 is the
            subsampling's output) instead of the encoder's output.
    Returns:
        ProbeSet in the index's order.
    """
    from streamssl.data.loader import build_loader

    if encoder is not None and layer is not None and not 0 <= layer <= encoder.n_layers:
        raise ValueError(f"layer must be in 0..{encoder.n_layers} for this encoder, got {layer}")
    loader = build_loader(index, None, batch_seconds=batch_seconds, shuffle=False, num_workers=0,
                          sample_rate=features.sample_rate, strict=True)
    frames: dict[int, torch.Tensor] = {}
    for batch in loader:
        feats, lengths = features(batch["audio"], batch["audio_lengths"])
        if encoder is not None:
            out, out_len = _encode(encoder, feats, lengths, layer)
        else:
            B, T, Fdim = feats.shape
            Tq = -(-T // stack)
            feats = torch.nn.functional.pad(feats, (0, 0, 0, Tq * stack - T))
            out, out_len = feats.reshape(B, Tq, stack * Fdim), -(-lengths // stack)
        for b, i in enumerate(batch["indices"].tolist()):
            frames[i] = out[b, : int(out_len[b])].float().clone()
    return ProbeSet([frames[i] for i in range(len(index))], [index.text(i) for i in range(len(index))])


def _encode(encoder, feats: torch.Tensor, lengths: torch.Tensor, layer: int | None):
    """The encoder's output, or block ``layer``'s (caught by a forward hook: the encoder's own
    forward runs unchanged)."""
    if layer is None or layer == encoder.n_layers:
        return encoder(feats, lengths)
    module = encoder.subsampling if layer == 0 else encoder.layers[layer - 1]
    caught = []
    handle = module.register_forward_hook(lambda m, args, out: caught.append(out[0] if isinstance(out, tuple) else out))
    try:
        _, out_len = encoder(feats, lengths)
    finally:
        handle.remove()
    return caught[0], out_len


class MLPProbe(nn.Module):
    """Standardise -> Linear(D, hidden) -> GELU -> Linear(hidden, V + 1) -> log-softmax, per frame."""

    def __init__(self, dim: int, vocab_size: int, hidden: int = 256, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.clone())
        self.register_buffer("std", torch.ones(dim) if std is None else std.clone())
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, vocab_size + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net((x - self.mean) / self.std), dim=-1)


def _pad(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.int64)
    x = torch.zeros(len(frames), int(lengths.max()), frames[0].shape[1])
    for b, f in enumerate(frames):
        x[b, : f.shape[0]] = f
    return x, lengths


def train_probe(train: ProbeSet, tokenizer: Tokenizer, *, hidden: int = 256, steps: int = 1500,
                batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> MLPProbe:
    """Fit an ``MLPProbe`` with CTC (Adam, cosine decay), deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.cat(train.frames)
    probe = MLPProbe(cat.shape[1], tokenizer.vocab_size, hidden, cat.mean(0), cat.std(0).clamp(min=1e-5))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe.net.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
    targets = [torch.tensor(tokenizer.encode(t), dtype=torch.int64) for t in train.texts]
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159265)).item()))
    n = len(train.frames)
    for _ in range(steps):
        pick = torch.randint(n, (min(batch_size, n),), generator=g).tolist()
        x, lengths = _pad([train.frames[i] for i in pick])
        y, y_len = _pad([targets[i].unsqueeze(1) for i in pick])
        loss = ctc_loss(probe(x), lengths, y.squeeze(-1).long(), y_len, tokenizer.blank_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


@torch.no_grad()
def score_probe(probe: MLPProbe, test: ProbeSet, tokenizer: Tokenizer) -> ErrorCounts:
    """Corpus WER/CER of the probe's greedy CTC transcripts on ``test``."""
    counts = ErrorCounts()
    for start in range(0, len(test.frames), 32):
        x, lengths = _pad(test.frames[start : start + 32])
        for ids, ref in zip(greedy_tokens(probe(x), lengths, tokenizer.blank_id), test.texts[start : start + 32]):
            counts.add(ref, tokenizer.decode(ids))
    return counts


def probe_error_rates(train: ProbeSet, test: ProbeSet, tokenizer: Tokenizer, **kwargs) -> dict:
    """Train a probe on ``train``, score it on ``test``: {"cer", "wer"} in percent."""
    counts = score_probe(train_probe(train, tokenizer, **kwargs), test, tokenizer)
    return {"cer": counts.cer, "wer": counts.wer}


REPRESENTATIONS = ("encoder", "random", "logmel")


def compare_representations(init, train_manifest, test_manifest, *, seeds=(0, 1), vocab_size: int = 128,
                            representations=REPRESENTATIONS, layer: int | None = None, log=None,
                            **probe_kwargs) -> dict[str, list[dict]]:
    """The frozen-probe comparison: a pretrained encoder against a random one and the raw input.

    Args:
        init: run directory, checkpoint or exported encoder (anything ``streamssl finetune --init``
            takes); its features (global statistics included) serve all three representations.
        train_manifest, test_manifest: transcribed manifests (every line has ``text``); the
            tokenizer (``vocab_size`` BPE pieces) is trained on the training transcripts.
        seeds: probe seeds; each representation gets one probe per seed, with the same budget.
        representations: a subset of ``REPRESENTATIONS``: ``encoder`` (the pretrained weights),
            ``random`` (the same architecture, fresh weights from seed 0), ``logmel`` (8 stacked
            log-mel frames per encoder frame).
        layer: probe conformer block ``layer``'s output of both encoders instead of the last
            (``extract_frames``).
        log: callable taking a progress line, or None.
        probe_kwargs: ``train_probe`` options (hidden, steps, batch_size, lr).
    Returns:
        {representation: [{"seed", "cer", "wer"} per seed]} in percent.
    """
    from streamssl.asr.model import read_init
    from streamssl.checkpoint import load_state_strict
    from streamssl.data.manifest import load_manifest
    from streamssl.nn.encoder import FastConformerEncoder
    from streamssl.ssl.features import LogMelFeatures

    unknown = [r for r in representations if r not in REPRESENTATIONS]
    if unknown:
        raise ValueError(f"representations: unknown {unknown}; choose from {list(REPRESENTATIONS)}")
    say = log or (lambda line: None)
    state = read_init(init)
    features = LogMelFeatures(**state["features_config"])
    load_state_strict(features, state["features"], state["source"])
    features.eval()
    encoders = {}
    if "encoder" in representations:
        encoders["encoder"] = FastConformerEncoder(**state["encoder_config"])
        load_state_strict(encoders["encoder"], state["encoder"], state["source"])
    if "random" in representations:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            encoders["random"] = FastConformerEncoder(**state["encoder_config"])
    if "logmel" in representations:
        encoders["logmel"] = None
    sets = {}
    for name, path in (("train", train_manifest), ("test", test_manifest)):
        sets[name] = load_manifest(path, keep_text=True, require_text=True)
    tokenizer = Tokenizer.train([sets["train"].text(i) for i in range(len(sets["train"]))], vocab_size)
    results: dict[str, list[dict]] = {}
    for rep in representations:
        enc = encoders[rep]
        if enc is not None:
            enc.eval()
        say(f"{rep}: extracting frames of {len(sets['train'])} + {len(sets['test'])} utterances")
        train, test = (extract_frames(sets[s], features, enc, layer=layer) for s in ("train", "test"))
        results[rep] = []
        for seed in seeds:
            r = probe_error_rates(train, test, tokenizer, seed=seed, **probe_kwargs)
            say(f"{rep}: probe seed {seed}: CER {r['cer']:.1f} %, WER {r['wer']:.1f} %")
            results[rep].append({"seed": seed, **r})
    return results
