"""The pretraining task: NEST / BEST-RQ targets from clean audio, predictions from the noisy stream.

Validation reports, next to ``val_loss`` and ``val_acc``, what a model that ignores its input
would score on the same targets, so a run can be judged without a downstream task:

* ``val_majority_acc``: always guess each codebook's most frequent validation target;
* ``val_marginal_ce``: the validation targets' own unigram entropy (an in-sample, optimistic bar);
* ``val_prior_ce``: cross-entropy under the unigram distribution estimated on training data
  (the head's starting point; the bar an input-blind model can actually reach);
* ``val_effective_rank``: exp(entropy of the normalised eigenvalues of the encoder output's
  covariance), between 1 (collapsed to a line) and d_model. A collapsed encoder scores low.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from streamssl.config import ConfigError, as_list
from streamssl.data.loader import build_loader
from streamssl.data.manifest import load_manifest
from streamssl.ssl.loss import code_usage
from streamssl.ssl.nest import NEST
from streamssl.train.loop import STATS_SECONDS, Runtime, Trainer, decay_param_groups, global_feature_stats, run

# Seconds of training audio behind the head's prior (about 20k tokens per 1000 codes at 80 ms).
PRIOR_SECONDS = 1800.0


def resolve_pretrain_data(cfg: DictConfig, out_dir: Path, rt: Runtime) -> dict:
    """Manifest paths; makes the embedded demo corpus when no training manifest is configured."""
    d = cfg.data
    cuts = d.get("train_cuts")
    if not cuts and OmegaConf.is_missing(d, "train_manifest"):
        raise ConfigError("data.train_manifest: required by this recipe (a JSON-lines manifest or a list of them)")
    train = [] if cuts else as_list(d.train_manifest)
    val, noise = d.val_manifest, d.noise_manifest
    if not train and not cuts:
        corpus = demo_corpus(d, out_dir, rt)
        train = [corpus["pretrain"]]
        val = val if val is not None else corpus["val"]
        noise = noise if noise is not None else corpus["noise"]
    return {"train": [str(p) for p in train], "val": str(val) if val else None, "noise": str(noise) if noise else None}


def demo_corpus(d: DictConfig, out_dir: Path, rt: Runtime) -> dict:
    """The recipe's embedded corpus (``data.demo_corpus``: speech or phones), written on first use."""
    root = (Path(d.demo_dir) if d.demo_dir else out_dir / "demo_data").resolve()
    if d.demo_corpus == "phones":
        from streamssl.data.demo import make_demo_corpus as make

        names = {"pretrain": "train.json", "train": "train.json", "val": "val.json", "noise": "noise.json"}
    else:
        from streamssl.data.speech_corpus import make_speech_corpus as make

        names = {k: f"{k}.json" for k in ("pretrain", "train", "val", "test", "noise")}
    paths = {k: root / v for k, v in names.items()}
    if rt.is_main and not all(p.is_file() for p in paths.values()):
        print(f"streamssl: writing the {d.demo_corpus} demo corpus to {root}", file=sys.stderr, flush=True)
        make(root)
    rt.barrier()
    return {k: str(p) for k, p in paths.items()}


def effective_rank(n: float, s: torch.Tensor, ss: torch.Tensor) -> float:
    """exp(entropy) of the eigenvalues of the covariance from n frames, their sum s (D,) and
    sum of outer products ss (D, D), all float64."""
    if n < 2:
        return float("nan")
    mean = s / n
    cov = ss / n - torch.outer(mean, mean)
    ev = torch.linalg.eigvalsh(cov).clamp(min=0)
    p = ev / ev.sum().clamp(min=1e-30)
    return float(torch.exp(-(p * p.clamp(min=1e-30).log()).sum()))


class PretrainTask:
    """NEST pretraining of a streaming encoder (see the loop module for the task protocol)."""

    name = "pretrain"
    weight_name = "num_targets"

    def __init__(self, cfg: DictConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.device = rt.device
        d, t = cfg.data, cfg.trainer
        # Data first: a bad manifest fails before any model is built or step is taken.
        paths = resolve_pretrain_data(cfg, rt.out, rt)
        weights = list(d.train_weights) if d.train_weights is not None else None
        self.train_tarred = None
        if d.train_tarred_audio_filepaths:  # tar shards (NeMo's layout), read as a stream
            from streamssl.data.shard_loader import load_tarred_manifest

            patterns = [str(p) for p in as_list(d.train_tarred_audio_filepaths)]
            self.train_tarred = load_tarred_manifest(paths["train"], patterns, min_duration=d.min_duration,
                                                     max_duration=d.max_duration)
            self.train_index = self.train_tarred.index
        elif d.train_cuts and Path(d.train_cuts).is_dir():  # Lhotse Shar: tar shards, read as a stream
            from streamssl.data.lhotse_cuts import load_shar

            self.train_tarred = load_shar(d.train_cuts, min_duration=d.min_duration, max_duration=d.max_duration)
            self.train_index = self.train_tarred.index
        elif d.train_cuts:  # a Lhotse cut set (optional lhotse package), read file by file
            from streamssl.data.lhotse_cuts import load_cuts

            self.train_index = load_cuts(d.train_cuts, min_duration=d.min_duration, max_duration=d.max_duration)
        else:
            self.train_index = load_manifest(paths["train"], weights=weights, min_duration=d.min_duration,
                                             max_duration=d.max_duration)
        if len(self.train_index) == 0:
            raise ConfigError(f"data.train_manifest: no utterance of {paths['train']} lies within "
                              f"[{d.min_duration}, {d.max_duration}] s")
        self.noise_index = load_manifest(paths["noise"]) if paths["noise"] else None
        if self.noise_index is None and cfg.model.augment.prob > 0 and cfg.model.augment.noise_ratio > 0 and rt.is_main:
            print("streamssl: no data.noise_manifest: augmentation mixes in other utterances of the batch only "
                  "(set model.augment.prob=0 to train on clean audio)", file=sys.stderr, flush=True)
        self.val_index = (load_manifest(paths["val"], min_duration=d.min_duration, max_duration=d.max_duration)
                          if paths["val"] else None)
        self.sample_rate = cfg.model.features.sample_rate
        if self.train_tarred is not None:
            from streamssl.data.shard_loader import build_shard_loader

            self.loader = build_shard_loader(self.train_tarred, self.noise_index, batch_seconds=d.batch_seconds,
                                             seed=t.seed, rank=rt.rank, world_size=rt.world, num_workers=d.num_workers,
                                             sample_rate=self.sample_rate, strict=d.strict,
                                             shuffle_buffer=d.shuffle_buffer, pin_memory=self.device.type == "cuda")
        else:
            self.loader = build_loader(self.train_index, self.noise_index, batch_seconds=d.batch_seconds, seed=t.seed,
                                       rank=rt.rank, world_size=rt.world, num_workers=d.num_workers,
                                       sample_rate=self.sample_rate, strict=d.strict,
                                       pin_memory=self.device.type == "cuda")
        torch.manual_seed(t.seed)
        self.model = NEST(cfg.model, seed=t.seed).to(self.device)

    # -- set-up ------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return decay_param_groups({"model": self.model}, self.cfg.optim.weight_decay)

    def initialise(self) -> None:
        """Fresh run: global feature statistics and the head's prior, from the training data.

        Every rank computes the same numbers from the same seeded subset (no broadcast needed).
        """
        m, t = self.cfg.model, self.cfg.trainer
        if m.features.normalize == "global":
            global_feature_stats(self.model.features, m.features.stats, self.train_index, t.seed, self.rt,
                                 loader=None if m.features.stats else self._sample_loader(STATS_SECONDS))
        counts = torch.zeros(m.quantizer.num_codebooks, m.quantizer.num_codes, dtype=torch.float64)
        loader = self._sample_loader(PRIOR_SECONDS)
        if loader is None:
            loader = build_loader(self._seeded_subset(PRIOR_SECONDS), None, batch_seconds=self.cfg.data.batch_seconds,
                                  seed=t.seed, shuffle=False, num_workers=0, sample_rate=self.sample_rate,
                                  strict=self.cfg.data.strict)
        for raw in loader:
            if raw["audio"].shape[0]:
                counts += self.model.target_counts(raw["audio"].to(self.device), raw["audio_lengths"].to(self.device))
        if m.objective.head_prior:
            self.model.set_head_prior(counts)
        else:  # still record the prior: val_prior_ce is the honest input-blind baseline
            with torch.no_grad():
                p = (counts + 0.1) / (counts.sum(-1, keepdim=True) + 0.1 * counts.shape[-1])
                self.model.target_log_prior.copy_(p.log().to(self.model.target_log_prior))

    def _sample_loader(self, seconds: float):
        """From tar shards: a loader over whole shards (seeded) covering ``seconds``; else None (the
        per-file paths sample utterances instead)."""
        if self.train_tarred is None:
            return None
        from streamssl.data.shard_loader import build_shard_loader

        d = self.cfg.data
        return build_shard_loader(self.train_tarred.seeded_shards(seconds, self.cfg.trainer.seed), None,
                                  batch_seconds=d.batch_seconds, seed=self.cfg.trainer.seed, shuffle=False,
                                  num_workers=0, sample_rate=self.sample_rate, strict=d.strict)

    def _seeded_subset(self, seconds: float):
        index = self.train_index
        order = np.random.default_rng(self.cfg.trainer.seed).permutation(len(index))
        n = int(np.searchsorted(np.cumsum(index.durations[order]), seconds)) + 1
        return index.subset(np.sort(order[:n]))

    def checkpoint_extras(self) -> dict:
        return {}

    def before_step(self, step: int, optimizer) -> None:
        pass

    # -- steps -------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        return {k: batch[k].to(self.device, non_blocking=nb) for k in ("audio", "audio_lengths", "noise", "noise_lengths")
                if k in batch}

    def forward(self, module, raw: dict, generator) -> dict:
        b = self._to_device(raw)
        out = module(b["audio"], b["audio_lengths"], b.get("noise"), b.get("noise_lengths"), generator=generator)
        n = int(out["num_targets"])
        return {"loss": out["loss"], "weight": n, "sums": {"acc": float(out["acc"]) * n},
                "extras": (out["targets"], out["predictions"])}

    def step_metrics(self, extras: list) -> dict:
        C = self.cfg.model.quantizer.num_codes
        if not extras:
            return {}
        targets = torch.cat([e[0] for e in extras])
        preds = torch.cat([e[1] for e in extras])
        out = {}
        out["target_coverage"], out["target_entropy"] = code_usage(targets, C)
        out["pred_coverage"], out["pred_entropy"] = code_usage(preds, C)
        return out

    def postfix(self, m: dict) -> dict:
        return {"loss": m["loss"], "acc": m.get("acc", 0.0)}

    @torch.no_grad()
    def validate(self, model) -> dict | None:
        """Loss, accuracy, the input-blind baselines and the encoder's effective rank."""
        if self.val_index is None:
            return None
        d, t, q = self.cfg.data, self.cfg.trainer, self.cfg.model.quantizer
        loader = build_loader(self.val_index, None, batch_seconds=d.batch_seconds, seed=t.seed, rank=self.rt.rank,
                              world_size=self.rt.world, num_workers=0, sample_rate=self.sample_rate,
                              shuffle=False, strict=d.strict)
        D = self.cfg.model.encoder.d_model
        # loss, acc, targets, frames; the encoder moments; per-codebook target counts
        sums = torch.zeros(4, dtype=torch.float64)
        s, ss = torch.zeros(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
        counts = torch.zeros(q.num_codebooks, q.num_codes, dtype=torch.float64)
        for k, raw in enumerate(loader):
            if k >= t.max_val_batches:
                break
            if raw["audio"].shape[0] == 0:
                continue
            b = self._to_device(raw)
            out = model(b["audio"], b["audio_lengths"])
            n = int(out["num_targets"])
            enc, lens = out["encoded"], out["encoded_lengths"]
            valid = torch.arange(enc.shape[1], device=enc.device).unsqueeze(0) < lens.unsqueeze(1)
            x = enc[valid].double().cpu()
            sums += torch.tensor([float(out["loss"]) * n, float(out["acc"]) * n, n, x.shape[0]], dtype=torch.float64)
            s += x.sum(0)
            ss += x.T @ x
            for g in range(q.num_codebooks):
                counts[g] += torch.bincount(out["targets"][:, g].cpu(), minlength=q.num_codes).double()
        sums, s, ss, counts = (self.rt.all_reduce(v) for v in (sums, s, ss, counts))
        n = max(float(sums[2]), 1.0)
        total = counts.sum(-1, keepdim=True).clamp(min=1)
        p = counts / total
        log_prior = self.model.target_log_prior.double().cpu()
        return {
            "val_loss": float(sums[0]) / n, "val_acc": float(sums[1]) / n, "val_targets": int(sums[2]),
            # Accuracy of always predicting each codebook's most frequent target.
            "val_majority_acc": float(p.max(-1).values.mean()),
            # The validation targets' own unigram entropy: no input-blind model does better here.
            "val_marginal_ce": float(-(p * p.clamp(min=1e-30).log()).sum(-1).mean()),
            "val_prior_ce": float(-(p * log_prior).sum(-1).mean()),
            "val_effective_rank": effective_rank(float(sums[3]), s, ss),
        }

    def warnings(self, record: dict, step: int) -> list[str]:
        """At validation after warm-up: say so when the model is no better than ignoring its input."""
        if "val_loss" not in record or step <= self.cfg.optim.warmup_steps:
            return []
        out = []
        if record["val_loss"] >= record["val_marginal_ce"]:
            out.append(f"val_loss {record['val_loss']:.3f} is not below the targets' unigram entropy "
                       f"val_marginal_ce {record['val_marginal_ce']:.3f}: the encoder adds nothing over "
                       f"guessing code frequencies (see the README's 'Is it learning?')")
        if record["val_acc"] <= record["val_majority_acc"]:
            out.append(f"val_acc {record['val_acc']:.4f} is not above always guessing the most frequent code "
                       f"(val_majority_acc {record['val_majority_acc']:.4f})")
        return out


def pretrain_trainer(cfg: DictConfig, out_dir) -> Trainer:
    """A Trainer for ``cfg`` in ``out_dir`` (resuming a checkpoint there); call ``.fit()``."""
    rt = Runtime(cfg, out_dir)
    return Trainer(cfg, rt, PretrainTask(cfg, rt))


def pretrain(cfg: DictConfig, out_dir) -> dict:
    """``streamssl pretrain``: train to ``trainer.max_steps``; returns the last logged metrics."""
    return run(cfg, out_dir, PretrainTask)
