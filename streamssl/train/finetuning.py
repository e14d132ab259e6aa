"""The fine-tuning task: the (pretrained) streaming encoder + a CTC head over sentencepiece pieces.

``--init`` brings the encoder and its features (global statistics included) from a pretraining
run directory, checkpoint or exported encoder, or from an earlier fine-tuned model (its encoder
only: the head belongs to another tokenizer). Without it the same architecture starts from random
weights: the baseline every pretraining claim is measured against.

The tokenizer is trained on the training manifest's transcripts at the start of a fresh run,
saved as ``<out>/tokenizer.model`` and inside every checkpoint, so a checkpoint is a complete
recogniser.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from streamssl.asr.ctc import ctc_loss, greedy_tokens
from streamssl.asr.metrics import ErrorCounts
from streamssl.asr.model import CTCModel, model_state, read_init
from streamssl.asr.tokenizer import Tokenizer
from streamssl.checkpoint import load_state_strict
from streamssl.config import ConfigError, as_list
from streamssl.data.loader import build_loader
from streamssl.data.manifest import load_manifest
from streamssl.train.loop import Runtime, Trainer, decay_param_groups, global_feature_stats, run
from streamssl.train.pretraining import demo_corpus


def _contexts(ctx) -> list[list[int]]:
    ctx = OmegaConf.to_container(ctx) if not isinstance(ctx, list) else ctx
    return [list(p) for p in (ctx if ctx and isinstance(ctx[0], list) else [ctx])]


class FinetuneTask:
    """CTC fine-tuning (see the loop module for the task protocol).

    Args:
        cfg: from ``load_finetune_config``. rt: the Runtime.
        init: a path for ``read_init``, or None for random initialisation.
        context_override: True when the user set ``model.encoder.att_context_size`` explicitly:
            it must then be a context the initial encoder supports.
    """

    name = "finetune"
    weight_name = "utterances"

    def __init__(self, cfg: DictConfig, rt: Runtime, init: str | None = None, context_override: bool = False):
        self.cfg, self.rt, self.device = cfg, rt, rt.device
        d, t, m = cfg.data, cfg.trainer, cfg.model
        self.sample_rate = m.features.sample_rate
        train, val = as_list(d.train_manifest), d.val_manifest
        if not train:
            corpus = demo_corpus(OmegaConf.create({"demo_dir": d.demo_dir, "demo_corpus": "speech"}), rt.out, rt)
            train, val = [corpus["train"]], (val if val is not None else corpus["val"])
        self.train_index = load_manifest([str(p) for p in train], min_duration=d.min_duration,
                                         max_duration=d.max_duration, require_text=True)
        self.val_index = (load_manifest(str(val), min_duration=d.min_duration, max_duration=d.max_duration,
                                        require_text=True) if val else None)
        self.tokenizer = self._tokenizer(train)
        self.targets = [torch.tensor(self.tokenizer.encode(self.train_index.text(i)), dtype=torch.int64)
                        for i in range(len(self.train_index))]
        self.loader = build_loader(self.train_index, None, batch_seconds=d.batch_seconds, seed=t.seed, rank=rt.rank,
                                   world_size=rt.world, num_workers=d.num_workers, sample_rate=self.sample_rate,
                                   strict=d.strict, pin_memory=self.device.type == "cuda")
        self.init = read_init(init) if init else None
        enc_cfg = OmegaConf.to_container(m.encoder, resolve=True)
        feat_cfg = OmegaConf.to_container(m.features, resolve=True)
        feat_cfg.pop("stats", None)
        if self.init is not None:
            wanted = _contexts(enc_cfg["att_context_size"])
            enc_cfg, feat_cfg = dict(self.init["encoder_config"]), dict(self.init["features_config"])
            supported = _contexts(enc_cfg["att_context_size"])
            if context_override:
                if any(c not in supported for c in wanted):
                    raise ConfigError(f"model.encoder.att_context_size: {wanted} is not among the contexts the "
                                      f"encoder of {self.init['source']} was trained with ({supported})")
                enc_cfg["att_context_size"] = wanted if len(wanted) > 1 else wanted[0]
        torch.manual_seed(t.seed)
        sa = OmegaConf.to_container(m.specaugment, resolve=True)
        self.model = CTCModel(enc_cfg, feat_cfg, self.tokenizer.vocab_size, specaugment=sa, seed=t.seed).to(self.device)
        if self.init is not None:
            load_state_strict(self.model.encoder, self.init["encoder"], self.init["source"])
            load_state_strict(self.model.features, self.init["features"], self.init["source"])

    def _tokenizer(self, train: list) -> Tokenizer:
        """The run's tokenizer: the saved one on resume, else trained on the training transcripts."""
        path = self.rt.out / "tokenizer.model"
        tk = self.cfg.model.tokenizer
        if not path.is_file():
            if self.rt.is_main:
                texts = [self.train_index.text(i) for i in range(len(self.train_index))]
                Tokenizer.train(texts, tk.vocab_size, tk.type, source=", ".join(map(str, train))).save(path)
            self.rt.barrier()
        tok = Tokenizer.load(path)
        if tok.vocab_size != tk.vocab_size:
            raise ConfigError(f"model.tokenizer.vocab_size: {tk.vocab_size}, but this run's {path} has "
                              f"{tok.vocab_size} pieces (use a new --out for a new tokenizer)")
        return tok

    # -- set-up ------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return decay_param_groups({"encoder": self.model.encoder, "head": self.model.head}, self.cfg.optim.weight_decay)

    def initialise(self) -> None:
        """Fresh run from scratch with normalize=global: statistics from the training manifest."""
        f = self.cfg.model.features
        if self.init is None and f.normalize == "global":
            global_feature_stats(self.model.features, f.stats, self.train_index, self.cfg.trainer.seed, self.rt)

    def before_step(self, step: int, optimizer) -> None:
        """Hold the encoder still for the first ``optim.freeze_encoder_steps`` steps.

        Its learning rate is 0 (the scheduler sets it back afterwards): with AdamW that leaves the
        weights bit-identical, and every parameter still gets a gradient, as DDP requires.
        """
        if step < self.cfg.optim.freeze_encoder_steps:
            for g in optimizer.param_groups:
                if g.get("name") == "encoder":
                    g["lr"] = 0.0

    def checkpoint_extras(self) -> dict:
        return model_state(self.model, self.tokenizer)

    # -- steps -------------------------------------------------------------------------------------
    def _batch_targets(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.targets[i] for i in indices.tolist()]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        padded = torch.zeros(len(seqs), max(int(lengths.max()), 1), dtype=torch.int64)
        for b, s in enumerate(seqs):
            padded[b, : len(s)] = s
        return padded.to(self.device), lengths.to(self.device)

    def forward(self, module, raw: dict, generator) -> dict:
        audio, lengths = raw["audio"].to(self.device), raw["audio_lengths"].to(self.device)
        log_probs, out_lengths = module(audio, lengths, generator=generator)
        targets, target_lengths = self._batch_targets(raw["indices"])
        loss = ctc_loss(log_probs, out_lengths, targets, target_lengths, self.model.blank_id)
        # Utterances with fewer frames than their transcript needs cannot be aligned (CTC gives
        # inf, zeroed): counted so that a wrong vocabulary size or frame rate shows.
        too_short = int((out_lengths < target_lengths).sum())
        B = audio.shape[0]
        return {"loss": loss, "weight": B, "sums": {"unalignable": float(too_short) * B}, "extras": None}

    def step_metrics(self, extras: list) -> dict:
        return {}

    def postfix(self, m: dict) -> dict:
        return {"loss": m["loss"]}

    @torch.no_grad()
    def validate(self, model) -> dict | None:
        """``val_loss``, ``val_wer``, ``val_cer`` (percent) of offline greedy decoding."""
        if self.val_index is None:
            return None
        d, t = self.cfg.data, self.cfg.trainer
        loader = build_loader(self.val_index, None, batch_seconds=d.batch_seconds, seed=t.seed, rank=self.rt.rank,
                              world_size=self.rt.world, num_workers=0, sample_rate=self.sample_rate, shuffle=False,
                              strict=d.strict)
        counts = ErrorCounts()
        loss_sum, n = 0.0, 0
        for k, raw in enumerate(loader):
            if k >= t.max_val_batches:
                break
            if raw["audio"].shape[0] == 0:
                continue
            log_probs, out_lengths = model(raw["audio"].to(self.device), raw["audio_lengths"].to(self.device))
            refs = [self.val_index.text(i) for i in raw["indices"].tolist()]
            seqs = [torch.tensor(self.tokenizer.encode(r), dtype=torch.int64) for r in refs]
            y = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(self.device)
            y_len = torch.tensor([len(s) for s in seqs], device=self.device)
            loss_sum += float(ctc_loss(log_probs, out_lengths, y, y_len, self.model.blank_id)) * len(refs)
            n += len(refs)
            for ids, ref in zip(greedy_tokens(log_probs, out_lengths, self.model.blank_id), refs):
                counts.add(ref, self.tokenizer.decode(ids))
        totals = self.rt.all_reduce(torch.tensor([loss_sum, n, *counts.as_tuple()], dtype=torch.float64)).tolist()
        merged = ErrorCounts.from_tuple(totals[2:])
        return {"val_loss": totals[0] / max(totals[1], 1.0), "val_wer": merged.wer, "val_cer": merged.cer}

    def warnings(self, record: dict, step: int) -> list[str]:
        if record.get("unalignable", 0) > 0.5:
            return [f"{record['unalignable']:.0%} of the batch has more pieces than encoder frames: "
                    f"lower model.tokenizer.vocab_size or check the manifest's text"]
        return []


def finetune_trainer(cfg: DictConfig, out_dir, init: str | None = None, context_override: bool = False) -> Trainer:
    """A Trainer for ``cfg`` in ``out_dir`` (resuming a checkpoint there); call ``.fit()``."""
    rt = Runtime(cfg, out_dir)
    return Trainer(cfg, rt, FinetuneTask(cfg, rt, init, context_override))


def finetune(cfg: DictConfig, out_dir, init: str | None = None, context_override: bool = False) -> dict:
    """``streamssl finetune``: train to ``trainer.max_steps``; returns the last logged metrics."""
    if init is not None and (Path(out_dir) / "checkpoints" / "last.pt").is_file():
        print(f"streamssl: {out_dir} holds a checkpoint: resuming it (--init is only read at the start)",
              file=sys.stderr, flush=True)
    return run(cfg, out_dir, lambda c, rt: FinetuneTask(c, rt, init, context_override))
