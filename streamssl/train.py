"""The pretraining loop: data, NEST model, AdamW + Noam, DDP, logging, checkpoints, exact resume.

Exact resume: everything random in a step is a pure function of (seed, step, rank) — dropout
(the global RNG is re-seeded per step), augmentation and dither (a generator seeded per step) —
or is state saved in the checkpoint — the masking counter and the encoder's multi-latency draw
counter (both in the model's state dict), the optimiser, the schedule and the data position. A
resumed run therefore computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from streamssl.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from streamssl.config import ConfigError, as_list, to_yaml
from streamssl.data.loader import build_loader
from streamssl.data.manifest import load_manifest
from streamssl.ssl.loss import code_usage
from streamssl.ssl.nest import NEST

CHECKPOINT_VERSION = 1


def noam_lambda(warmup_steps: int, peak_lr: float, min_lr: float):
    """Multiplier of the peak learning rate at a step: linear warm-up, then 1/sqrt decay.

    lr(step) = peak * min(step / warmup, sqrt(warmup / step)), floored at min_lr; step counts
    from 1 (the first optimiser step does not use lr = 0).
    """
    floor = min_lr / peak_lr

    def f(step: int) -> float:
        s = step + 1
        if warmup_steps <= 0:
            return 1.0
        return max(floor, min(s / warmup_steps, math.sqrt(warmup_steps / s)))

    return f


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for (seed, step, rank): distinct streams, reproducible."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % 2**64
    h ^= h >> 31
    return h % 2**63


class _Interrupt:
    """SIGINT/SIGTERM stop the run at the next step boundary with a checkpoint (a second SIGINT
    kills at once)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _pick_device(cfg: DictConfig, local_rank: int) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device: cuda was asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _resolve_data(cfg: DictConfig, out_dir: Path, rank: int) -> dict:
    """Manifest paths; makes the demo corpus when no training manifest is configured."""
    d = cfg.data
    if OmegaConf.is_missing(d, "train_manifest"):
        raise ConfigError("data.train_manifest: required by this recipe (a JSON-lines manifest or a list of them)")
    train = as_list(d.train_manifest)
    val, noise = d.val_manifest, d.noise_manifest
    if not train:
        from streamssl.data.demo import make_demo_corpus

        root = (Path(d.demo_dir) if d.demo_dir else out_dir / "demo_data").resolve()
        # make_demo_corpus writes these three manifests (and the audio they list).
        corpus = {"train": root / "train.json", "val": root / "val.json", "noise": root / "noise.json"}
        if rank == 0 and not all(p.is_file() for p in corpus.values()):
            print(f"streamssl: writing the demo corpus to {root}", file=sys.stderr, flush=True)
            make_demo_corpus(root)
        if dist.is_initialized():
            dist.barrier()
        train = [corpus["train"]]
        val = val if val is not None else corpus["val"]
        noise = noise if noise is not None else corpus["noise"]
    return {"train": [str(p) for p in train], "val": str(val) if val else None, "noise": str(noise) if noise else None}


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class Trainer:
    """Runs ``streamssl pretrain``: ``Trainer(cfg, out_dir).fit()``.

    Args:
        cfg: a resolved config from ``streamssl.config.load_config``.
        out_dir: the run directory (config.yaml, metrics.jsonl, checkpoints/last.pt). If it holds
            a checkpoint, training resumes from it.
    """

    def __init__(self, cfg: DictConfig, out_dir: str | os.PathLike):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world, local_rank = _dist_env()
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if (cfg.trainer.device != "cpu" and torch.cuda.is_available()) else "gloo"
            dist.init_process_group(backend=backend)
        self.device = _pick_device(cfg, local_rank)
        self.is_main = self.rank == 0
        t = cfg.trainer
        self.amp = self.device.type == "cuda" and t.precision in ("auto", "bf16")
        if t.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("trainer.precision: bf16 autocast is for CUDA; use fp32 (or auto) on CPU")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))

        # Data first: a bad manifest fails before any model is built or step is taken.
        paths = _resolve_data(cfg, self.out, self.rank)
        d = cfg.data
        weights = list(d.train_weights) if d.train_weights is not None else None
        self.train_index = load_manifest(paths["train"], weights=weights, min_duration=d.min_duration,
                                         max_duration=d.max_duration)
        if len(self.train_index) == 0:
            raise ConfigError(f"data.train_manifest: no utterance of {paths['train']} lies within "
                              f"[{d.min_duration}, {d.max_duration}] s")
        self.noise_index = load_manifest(paths["noise"]) if paths["noise"] else None
        self.val_index = (load_manifest(paths["val"], min_duration=d.min_duration, max_duration=d.max_duration)
                          if paths["val"] else None)
        sr = cfg.model.features.sample_rate
        self.loader = build_loader(self.train_index, self.noise_index, batch_seconds=d.batch_seconds, seed=t.seed,
                                   rank=self.rank, world_size=self.world, num_workers=d.num_workers,
                                   sample_rate=sr, strict=d.strict, pin_memory=self.device.type == "cuda")

        torch.manual_seed(t.seed)
        self.model = NEST(cfg.model, seed=t.seed).to(self.device)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, noam_lambda(o.warmup_steps, o.lr, o.min_lr))
        self.step = 0
        self.ckpt_dir = self.out / "checkpoints"
        self._resume()
        if self.step == 0:
            self._initialise_from_data()
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _initialise_from_data(self) -> None:
        """Fresh run: global feature statistics and the head's prior, from the training data.

        Every rank computes the same numbers from the same seeded subset (no broadcast needed).
        """
        m, t = self.cfg.model, self.cfg.trainer
        if m.features.normalize == "global":
            from streamssl.ssl.features import compute_global_stats, save_stats

            if m.features.stats:
                self.model.features.load_stats(m.features.stats)
            else:
                stats = compute_global_stats(self.train_index, self.model.features, max_seconds=3600.0, seed=t.seed)
                self.model.features.set_stats(stats["mean"], stats["std"])
                if self.is_main:
                    save_stats(self.out / "feature_stats.json", stats)
        if m.objective.head_prior:
            subset = self._seeded_subset(600.0)
            loader = build_loader(subset, None, batch_seconds=self.cfg.data.batch_seconds, seed=t.seed, shuffle=False,
                                  num_workers=0, sample_rate=m.features.sample_rate, strict=self.cfg.data.strict)
            counts = torch.zeros(m.quantizer.num_codebooks, m.quantizer.num_codes, dtype=torch.float64)
            for raw in loader:
                if raw["audio"].shape[0]:
                    counts += self.model.target_counts(raw["audio"].to(self.device), raw["audio_lengths"].to(self.device))
            self.model.set_head_prior(counts)

    def _seeded_subset(self, seconds: float):
        import numpy as np

        index = self.train_index
        order = np.random.default_rng(self.cfg.trainer.seed).permutation(len(index))
        n = int(np.searchsorted(np.cumsum(index.durations[order]), seconds)) + 1
        return index.subset(np.sort(order[:n]))

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": _rng_state(self.device),
            "world_size": self.world,
            "config": to_yaml(self.cfg),
        }

    def _resume(self) -> None:
        last = self.ckpt_dir / "last.pt"
        if not last.is_file():
            return
        state = load_checkpoint(last)
        if state.get("world_size", 1) != self.world:
            raise CheckpointError(f"{last} was written by a run of {state.get('world_size')} processes; this one "
                               f"has {self.world}: the data position cannot be carried over exactly")
        load_state_strict(self.model, state["model"], str(last))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        if self.is_main:
            print(f"streamssl: resuming from {last} at step {self.step}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def check_replicas(self) -> None:
        """Raise if the ranks' parameters differ (a DDP desync would silently waste the run).

        Each rank reduces its parameters to a few float64 moments; bit-identical replicas give
        bit-identical moments, so any difference is a real divergence.
        """
        if self.world == 1:
            return
        moments = torch.zeros(3, dtype=torch.float64, device=self.device)
        for p in self.model.parameters():
            x = p.detach().double().flatten()
            moments += torch.stack([x.sum(), x.square().sum(), (x * torch.arange(x.numel(), device=x.device)).sum()])
        gathered = [torch.empty_like(moments) for _ in range(self.world)]
        if dist.get_backend() != "nccl":
            moments = moments.cpu()
            gathered = [g.cpu() for g in gathered]
        dist.all_gather(gathered, moments)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"step {self.step}: model replicas differ across ranks: {[g.tolist() for g in gathered]}")

    def save(self) -> Path | None:
        self.check_replicas()
        if not self.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.ckpt_dir, self.step, self.cfg.trainer.keep_last)

    # -- steps -------------------------------------------------------------------------------------
    def _batches(self):
        while True:
            yield from self.loader

    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        out = {k: batch[k].to(self.device, non_blocking=nb) for k in ("audio", "audio_lengths")}
        if "noise" in batch:
            out["noise"] = batch["noise"].to(self.device, non_blocking=nb)
            out["noise_lengths"] = batch["noise_lengths"].to(self.device, non_blocking=nb)
        return out

    def _forward(self, batch: dict, generator: torch.Generator | None) -> dict:
        model = self.ddp if self.ddp is not None else self.model
        if batch["audio"].shape[0] == 0:
            # Every file of this batch was unreadable: take part in the step with a zero loss that
            # touches every parameter, so DDP ranks stay in step.
            zero = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            empty = torch.zeros(0, self.cfg.model.quantizer.num_codebooks, dtype=torch.int64, device=self.device)
            return {"loss": zero, "acc": zero.detach(), "num_targets": torch.zeros((), dtype=torch.int64,
                    device=self.device), "targets": empty, "predictions": empty}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with autocast:
            return model(batch["audio"], batch["audio_lengths"], batch.get("noise"), batch.get("noise_lengths"),
                         generator=generator)

    def train_step(self, batches) -> dict:
        """One optimiser step over ``accumulate_grad_batches`` micro-batches; returns metrics."""
        t = self.cfg.trainer
        self.model.train()
        seed = step_seed(t.seed, self.step, self.rank)
        gen = torch.Generator(device=self.device).manual_seed(seed)  # augmentation, dither
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "acc": 0.0, "num_targets": 0, "seconds": 0.0, "skipped": 0}
        targets, preds = [], []
        accum = t.accumulate_grad_batches
        for micro in range(accum):
            raw = next(batches)
            # Dropout draws from the global RNG. Seed it after fetching the batch: starting a
            # DataLoader iterator (as a resumed run does) consumes global random numbers.
            torch.manual_seed(seed + micro)
            batch = self._to_device(raw)
            sync = self.ddp.no_sync() if (self.ddp is not None and micro < accum - 1) else nullcontext()
            with sync:
                out = self._forward(batch, gen)
                (out["loss"] / accum).backward()
            n = int(out["num_targets"])
            sums["loss"] += float(out["loss"].detach()) * n
            sums["acc"] += float(out["acc"]) * n
            sums["num_targets"] += n
            sums["seconds"] += float(raw["audio_lengths"].sum()) / self.cfg.model.features.sample_rate
            sums["skipped"] += len(raw["skipped"])
            targets.append(out["targets"])
            preds.append(out["predictions"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = self._reduce(sums)
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        num_codes = self.cfg.model.quantizer.num_codes
        metrics["target_coverage"], metrics["target_entropy"] = code_usage(torch.cat(targets), num_codes)
        metrics["pred_coverage"], metrics["pred_entropy"] = code_usage(torch.cat(preds), num_codes)
        return metrics

    def _reduce(self, sums: dict) -> dict:
        """Token-weighted loss/acc over micro-batches and ranks."""
        vals = torch.tensor([sums["loss"], sums["acc"], sums["num_targets"], sums["seconds"], sums["skipped"]],
                            dtype=torch.float64)
        if self.world > 1:
            backend_dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            vals = vals.to(backend_dev)
            dist.all_reduce(vals)
            vals = vals.cpu()
        n = max(vals[2].item(), 1.0)
        return {"loss": vals[0].item() / n, "acc": vals[1].item() / n, "num_targets": int(vals[2].item()),
                "audio_seconds": vals[3].item(), "skipped": int(vals[4].item())}

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Loss and accuracy on the validation manifest (fixed masks, no augmentation)."""
        if self.val_index is None:
            return None
        d, t = self.cfg.data, self.cfg.trainer
        loader = build_loader(self.val_index, None, batch_seconds=d.batch_seconds, seed=t.seed, rank=self.rank,
                              world_size=self.world, num_workers=0, sample_rate=self.cfg.model.features.sample_rate,
                              shuffle=False, strict=d.strict)
        self.model.eval()
        sums = {"loss": 0.0, "acc": 0.0, "num_targets": 0, "seconds": 0.0, "skipped": 0}
        q = self.cfg.model.quantizer
        counts = torch.zeros(q.num_codebooks, q.num_codes, dtype=torch.float64)
        try:
            for k, raw in enumerate(loader):
                if k >= t.max_val_batches:
                    break
                out = self._forward(self._to_device(raw), None)
                n = int(out["num_targets"])
                sums["loss"] += float(out["loss"]) * n
                sums["acc"] += float(out["acc"]) * n
                sums["num_targets"] += n
                for g in range(q.num_codebooks):
                    counts[g] += torch.bincount(out["targets"][:, g].cpu(), minlength=q.num_codes).double()
        finally:
            self.model.train()
        m = self._reduce(sums)
        if self.world > 1:
            counts = counts.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(counts)
            counts = counts.cpu()
        # Accuracy of always predicting each codebook's most frequent target: the bar a model
        # that learned nothing about the input would reach.
        total = counts.sum(-1, keepdim=True).clamp(min=1)
        p = counts / total
        majority = float(p.max(-1).values.mean())
        # The cross-entropy of the validation targets' own marginal distribution (nats): the
        # lowest loss any model that ignores its input can reach on this set.
        marginal = float(-(p * p.clamp(min=1e-30).log()).sum(-1).mean())
        return {"val_loss": m["loss"], "val_acc": m["acc"], "val_majority_acc": majority,
                "val_marginal_ce": marginal, "val_targets": m["num_targets"]}

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``trainer.max_steps`` (or until SIGINT/SIGTERM); returns the last metrics."""
        t = self.cfg.trainer
        metrics_path = self.out / "metrics.jsonl"
        if self.is_main and self.step == 0 and metrics_path.exists():
            metrics_path.unlink()  # a fresh run (no checkpoint) starts a fresh log
        if self.is_main and self.step > 0 and metrics_path.exists():
            self._truncate_metrics(metrics_path)
        writer = self._tensorboard()
        bar = None
        if self.is_main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        batches = self._batches()
        last: dict = {}
        window_start, window_seconds = time.perf_counter(), 0.0
        with _Interrupt() as interrupt:
            while self.step < t.max_steps:
                m = self.train_step(batches)
                window_seconds += m["audio_seconds"]
                val = self.validate() if self.step % t.val_every == 0 else None
                if self.step % t.log_every == 0 or val is not None or self.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    m["audio_sec_per_sec"] = window_seconds / max(elapsed, 1e-9)
                    window_start, window_seconds = time.perf_counter(), 0.0
                    record = {"step": self.step, **m, **(val or {})}
                    if self.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if writer is not None:
                            for k, v in record.items():
                                if k != "step" and isinstance(v, (int, float)):
                                    writer.add_scalar(k, v, self.step)
                    last = record
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}")
                stop = self._agree(interrupt.requested)
                if self.step % t.ckpt_every == 0 or self.step == t.max_steps or stop:
                    self.save()
                if stop:
                    if self.is_main:
                        print(f"\nstreamssl: interrupted at step {self.step}; checkpoint saved to "
                              f"{self.ckpt_dir / 'last.pt'}. Run the same command to resume.", file=sys.stderr)
                    break
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        return last

    def _agree(self, flag: bool) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        if self.world == 1:
            return flag
        v = torch.tensor([1.0 if flag else 0.0], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(v)
        return bool(v.item() > 0)

    def _truncate_metrics(self, path: Path) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    def _tensorboard(self):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


def pretrain(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Build a Trainer and run it; tears down the process group it created. Returns last metrics."""
    trainer = Trainer(cfg, out_dir)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
