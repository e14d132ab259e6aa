"""The training loop shared by pretraining and fine-tuning: DDP, AdamW + Noam, checkpoints, exact resume.

A *task* (``PretrainTask``, ``FinetuneTask``) owns what differs: the model, the data, the loss and
the validation metrics. The ``Trainer`` owns what does not: devices and ranks, the optimiser and
schedule, gradient accumulation and clipping, non-finite steps, checkpoints and resume, logging.

Exact resume: everything random in a step is a pure function of (seed, step, rank) — dropout
(the global RNG is re-seeded per step), augmentation and dither (a generator seeded per step) —
or is state saved in the checkpoint (the model's buffers, such as the masking counter, the
optimiser, the schedule and the data position). A resumed run computes the same losses as an
uninterrupted one.

A task provides:
    name: str                       progress-bar label
    model: nn.Module                everything that is trained or checkpointed
    loader                          the training loader (``state_dict``/``load_state_dict``)
    param_groups() -> list[dict]    AdamW groups (each with ``params`` and ``weight_decay``)
    initialise()                    a fresh run's data-dependent initialisation
    before_step(step, optimizer)    e.g. hold the encoder's learning rate at 0 while frozen
    forward(module, batch, generator) -> dict
        ``loss`` (scalar tensor), ``weight`` (int: what the loss is a mean over), ``sums``
        (float metrics times weight), ``extras`` (anything ``step_metrics`` needs)
    step_metrics(extras: list) -> dict
    validate(module) -> dict | None
    warnings(record, step) -> list[str]   said to the user when a logged record looks wrong
    postfix(metrics) -> dict        numbers for the progress bar
    checkpoint_extras() -> dict     saved next to the model (e.g. the tokenizer)
    sample_rate: int                to count seconds of audio
    weight_name: str                what ``weight`` counts, as logged (e.g. ``num_targets``)
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from streamssl.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from streamssl.config import ConfigError, to_yaml
from streamssl.train.host_memory import keep_freed_host_memory
from streamssl.train.runlog import RunLog
from streamssl.train.schedule import noam_lambda, step_seed

CHECKPOINT_VERSION = 1


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


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _pick_device(cfg: DictConfig, local_rank: int) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device: cuda was asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def decay_param_groups(modules: dict, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the weight matrices of Linear and convolution layers only.

    Biases, normalisation gains, embeddings and free parameters such as attention position
    biases are not decayed, whatever their shape. Each group carries ``name`` (the key of
    ``modules``) so that a task can treat, e.g., the encoder's groups apart.
    """
    matrix_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    groups = []
    for name, module in modules.items():
        decay, keep = [], []
        for m in module.modules():
            for pname, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                (decay if isinstance(m, matrix_types) and pname == "weight" else keep).append(p)
        groups.append({"params": decay, "weight_decay": weight_decay, "name": name})
        groups.append({"params": keep, "weight_decay": 0.0, "name": name})
    return groups


# Keys that may change between a run and its resumption: they do not touch what is computed.
RESUMABLE_KEYS = ("trainer.max_steps", "trainer.log_every", "trainer.ckpt_every", "trainer.val_every",
                  "trainer.max_val_batches", "trainer.keep_last", "trainer.progress", "trainer.max_nonfinite_steps",
                  "trainer.keep_host_memory", "data.num_workers", "data.val_manifest")


# Seconds of training audio behind the global feature statistics of a fresh run.
STATS_SECONDS = 3600.0


def global_feature_stats(features, stats_path, index, seed: int, rt: "Runtime", loader=None) -> None:
    """Give ``features`` (a LogMelFeatures with normalize=global) its mean/std for a fresh run.

    ``stats_path`` (model.features.stats) names a file from ``streamssl compute-stats``. Without
    it the statistics are measured on a seeded ``STATS_SECONDS`` subset of ``index`` (or on what
    ``loader`` yields, for tar shards), the same numbers on every rank, and the main rank writes
    them to ``<out>/feature_stats.json``.
    """
    from streamssl.ssl.features import compute_global_stats, save_stats

    if stats_path:
        try:
            features.load_stats(stats_path)
        except ValueError as e:
            raise ConfigError(f"model.features.stats: {e}") from None
        return
    stats = compute_global_stats(index, features, max_seconds=STATS_SECONDS, seed=seed, loader=loader)
    features.set_stats(stats["mean"], stats["std"])
    if rt.is_main:
        save_stats(rt.out / "feature_stats.json", stats)


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved_yaml: str, cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(allowed, refused) differences between a checkpoint's config and this run's, as ``key: a -> b``."""
    from omegaconf import OmegaConf

    old = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    allowed, refused = [], []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            line = f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            (allowed if k in RESUMABLE_KEYS else refused).append(line)
    return allowed, refused


class Runtime:
    """Where a run executes: rank, world size, device, autocast, run directory."""

    def __init__(self, cfg: DictConfig, out_dir: str | os.PathLike):
        self.rank, self.world, local_rank = dist_env()
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if (cfg.trainer.device != "cpu" and torch.cuda.is_available()) else "gloo"
            dist.init_process_group(backend=backend)
        self.device = _pick_device(cfg, local_rank)
        if self.device.type == "cpu" and cfg.trainer.keep_host_memory:
            keep_freed_host_memory()
        self.is_main = self.rank == 0
        t = cfg.trainer
        # auto: bf16 autocast on CUDA, float32 on CPU. bf16 on CPU pays off where the CPU has AMX
        # (large step 1.9x faster on a Sapphire Rapids-class Xeon, bench/RESULTS.md) and is slow
        # on CPUs without native bf16 matmuls, so it is asked for, never chosen.
        self.amp = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.out = Path(out_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def reduce_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a no-op for one process); returns a CPU tensor."""
        if self.world == 1:
            return t
        t = t.to(self.reduce_device())
        dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def _adamw(groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has it for these parameters (CPU and CUDA float tensors).

    The fused kernel updates every tensor in one pass: about 4x faster than the per-parameter loop
    for the small encoder on CPU (bench/RESULTS.md), with the same update rule.
    """
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported device/dtype
        return torch.optim.AdamW(groups, **kwargs)


class Trainer:
    """Runs a task to ``trainer.max_steps``: ``Trainer(cfg, runtime, task).fit()``.

    Args:
        cfg: a resolved config with ``optim`` and ``trainer`` sections.
        runtime: the ``Runtime`` the task was built for.
        task: see the module docstring. If the run directory holds a checkpoint, it is resumed.
    """

    def __init__(self, cfg: DictConfig, runtime: Runtime, task):
        self.cfg, self.rt, self.task = cfg, runtime, task
        self.out, self.device = runtime.out, runtime.device
        o = cfg.optim
        self.optimizer = _adamw(task.param_groups(), lr=o.lr, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, noam_lambda(o.warmup_steps, o.lr, o.min_lr))
        self.step = 0
        self.ckpt_dir = self.out / "checkpoints"
        self._resume()
        if self.step == 0:
            task.initialise()
        self.module = task.model
        if runtime.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                task.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.task.loader.state_dict(),
            "rng": _rng_state(self.device),
            "world_size": self.rt.world,
            "config": to_yaml(self.cfg),
            **self.task.checkpoint_extras(),
        }

    def _resume(self) -> None:
        last = self.ckpt_dir / "last.pt"
        if not last.is_file():
            return
        state = load_checkpoint(last)
        if state.get("world_size", 1) != self.rt.world:
            raise CheckpointError(f"{last} was written by a run of {state.get('world_size')} processes; this one "
                                  f"has {self.rt.world}: the data position cannot be carried over exactly")
        allowed, refused = config_changes(state["config"], self.cfg)
        if refused:
            raise CheckpointError(f"{last}: this run's config differs from the checkpoint's in keys that change what "
                                  f"is computed, so it cannot resume exactly:\n  " + "\n  ".join(refused) +
                                  "\nUse a new --out for a new run, or restore these values.")
        if allowed and self.rt.is_main:
            print("streamssl: resuming with changed settings: " + "; ".join(allowed), file=sys.stderr, flush=True)
        load_state_strict(self.task.model, state["model"], str(last))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.task.loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        if self.rt.is_main:
            print(f"streamssl: resuming from {last} at step {self.step}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def check_replicas(self) -> None:
        """Raise if the ranks' parameters differ (a DDP desync would silently waste the run).

        Each rank reduces its parameters to a few float64 moments; bit-identical replicas give
        bit-identical moments, so any difference is a real divergence.
        """
        if self.rt.world == 1:
            return
        moments = torch.zeros(3, dtype=torch.float64, device=self.device)
        for p in self.task.model.parameters():
            x = p.detach().double().flatten()
            moments += torch.stack([x.sum(), x.square().sum(), (x * torch.arange(x.numel(), device=x.device)).sum()])
        dev = self.rt.reduce_device()
        moments = moments.to(dev)
        gathered = [torch.empty_like(moments) for _ in range(self.rt.world)]
        dist.all_gather(gathered, moments)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"step {self.step}: model replicas differ across ranks: {[g.tolist() for g in gathered]}")

    def save(self) -> Path | None:
        bad = [n for n, p in self.task.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"step {self.step}: non-finite weights in {', '.join(bad[:5])}: not writing a checkpoint "
                               f"(the last good one is {self.ckpt_dir / 'last.pt'})")
        self.check_replicas()
        if not self.rt.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.ckpt_dir, self.step, self.cfg.trainer.keep_last)

    # -- one step ----------------------------------------------------------------------------------
    def _batches(self):
        while True:
            yield from self.task.loader

    def _forward(self, raw: dict, generator: torch.Generator | None) -> dict:
        if raw["audio"].shape[0] == 0:
            # Every file of this batch was unreadable. Take part in the step anyway, through the
            # same (DDP) module with one second of quiet noise and a zero weight: the gradient
            # all-reduce pairs with the other ranks' and the model's counters (masking, context
            # draws) advance as on them.
            g = torch.Generator().manual_seed(self.step)
            audio = torch.randn(1, self.task.sample_rate, generator=g) * 1e-3
            dummy = {"audio": audio, "audio_lengths": torch.tensor([self.task.sample_rate]),
                     "indices": torch.zeros(1, dtype=torch.int64), "skipped": raw["skipped"]}
            with self.rt.autocast():
                out = self.task.forward(self.module, dummy, generator)
            # The same metric keys as a real batch (zeros): every rank reduces vectors of one length.
            return {"loss": out["loss"] * 0.0, "weight": 0, "sums": {k: 0.0 for k in out["sums"]}, "extras": None}
        with self.rt.autocast():
            return self.task.forward(self.module, raw, generator)

    def train_step(self, batches) -> dict:
        """One optimiser step over ``accumulate_grad_batches`` micro-batches; returns metrics.

        A step whose gradient is not finite (a NaN/inf loss) changes no weight: it is counted in
        ``nonfinite_steps`` and training goes on, identically on every rank (the gradient norm
        is computed after DDP's all-reduce).
        """
        t = self.cfg.trainer
        self.task.model.train()
        self.task.before_step(self.step, self.optimizer)
        seed = step_seed(t.seed, self.step, self.rt.rank)
        gen = torch.Generator(device=self.device).manual_seed(seed)  # augmentation, dither
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {"loss": 0.0, "weight": 0.0, "seconds": 0.0, "skipped": 0.0}
        extras = []
        optimised = 0.0  # what the gradient minimises: the mean of the micro-batches' mean losses
        accum = t.accumulate_grad_batches
        for micro in range(accum):
            raw = next(batches)
            # Dropout draws from the global RNG. Seed it after fetching the batch: starting a
            # DataLoader iterator (as a resumed run does) consumes global random numbers.
            torch.manual_seed(seed + micro)
            sync = self.module.no_sync() if (self.rt.world > 1 and micro < accum - 1) else nullcontext()
            with sync:
                out = self._forward(raw, gen)
                (out["loss"] / accum).backward()
            w = int(out["weight"])
            optimised += float(out["loss"].detach()) / accum
            sums["loss"] += float(out["loss"].detach()) * w
            sums["weight"] += w
            for k, v in out["sums"].items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["seconds"] += float(raw["audio_lengths"].sum()) / self.task.sample_rate
            sums["skipped"] += len(raw["skipped"])
            extras.append(out["extras"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), t.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on below)
        if finite:
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.step += 1
        metrics = self._reduce(sums)
        # `loss` weighs every target (token or utterance) alike across micro-batches and ranks;
        # `loss_optimised` is the objective of the step, each micro-batch's mean weighted alike.
        metrics["loss_optimised"] = float(self.rt.all_reduce(torch.tensor([optimised], dtype=torch.float64))) / self.rt.world
        metrics["grad_norm"] = float(grad_norm)
        metrics["nonfinite"] = 0 if finite else 1
        metrics["lr"] = lr
        metrics.update(self.task.step_metrics([e for e in extras if e is not None]))
        return metrics

    def _reduce(self, sums: dict) -> dict:
        """Weighted means over micro-batches and ranks (``seconds``, ``skipped``, ``weight`` summed)."""
        keys = sorted(sums)
        vals = self.rt.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        total = dict(zip(keys, vals.tolist()))
        n = max(total["weight"], 1.0)
        out = {k: v / n for k, v in total.items() if k not in ("weight", "seconds", "skipped")}
        out[self.task.weight_name] = int(total["weight"])
        out.update(audio_seconds=total["seconds"], skipped=int(total["skipped"]))
        return out

    # -- the loop ----------------------------------------------------------------------------------
    def validate(self) -> dict | None:
        self.task.model.eval()
        try:
            with torch.no_grad(), self.rt.autocast():
                return self.task.validate(self.task.model)
        finally:
            self.task.model.train()

    def fit(self) -> dict:
        """Train to ``trainer.max_steps`` (or until SIGINT/SIGTERM); returns the last metrics."""
        t = self.cfg.trainer
        log = RunLog(self.out, enabled=self.rt.is_main, step=self.step, max_steps=t.max_steps,
                     desc=self.task.name, progress=t.progress)
        batches = self._batches()
        last: dict = {}
        nonfinite = in_a_row = 0
        window_start, window_seconds = time.perf_counter(), 0.0
        try:
            with _Interrupt() as interrupt:
                while self.step < t.max_steps:
                    m = self.train_step(batches)
                    window_seconds += m["audio_seconds"]
                    if m["nonfinite"]:
                        nonfinite += 1
                        in_a_row += 1
                        log.say(f"streamssl: step {self.step}: non-finite gradient (loss {m['loss']}); "
                                f"the step was skipped ({nonfinite} so far)")
                        if in_a_row >= t.max_nonfinite_steps:
                            raise RuntimeError(
                                f"step {self.step}: {in_a_row} non-finite steps in a row (trainer.max_nonfinite_steps); "
                                f"stopping. The last checkpoint ({self.ckpt_dir / 'last.pt'}) has finite weights: "
                                f"lower optim.lr or check the data, then rerun to resume")
                    else:
                        in_a_row = 0
                    val = self.validate() if self.step % t.val_every == 0 else None
                    if self.step % t.log_every == 0 or val is not None or self.step == t.max_steps:
                        elapsed = time.perf_counter() - window_start
                        m["audio_sec_per_sec"] = window_seconds / max(elapsed, 1e-9)
                        window_start, window_seconds = time.perf_counter(), 0.0
                        last = {"step": self.step, **m, **(val or {})}
                        log.write(last)
                        for warning in self.task.warnings(last, self.step):
                            log.say(f"streamssl: warning: step {self.step}: {warning}")
                    log.tick(**self.task.postfix(m))
                    stop = self._agree(interrupt.requested)
                    if self.step % t.ckpt_every == 0 or self.step == t.max_steps or stop:
                        self.save()
                    if stop:
                        log.say(f"\nstreamssl: interrupted at step {self.step}; checkpoint saved to "
                                f"{self.ckpt_dir / 'last.pt'}. Run the same command to resume.")
                        break
        finally:
            log.close()
        return last

    def _agree(self, flag: bool) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        if self.rt.world == 1:
            return flag
        return bool(self.rt.all_reduce(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def run(cfg: DictConfig, out_dir: str | os.PathLike, make_task) -> dict:
    """Build the runtime, the task (``make_task(cfg, runtime)``) and a Trainer, and train.

    Tears down the process group it created. Returns the last logged metrics.
    """
    runtime = Runtime(cfg, out_dir)
    trainer, finished = None, False
    try:
        trainer = Trainer(cfg, runtime, make_task(cfg, runtime))
        metrics = trainer.fit()
        finished = True
        return metrics
    finally:
        if dist.is_initialized():
            # Free the DDP wrapper (its reducer holds gloo work) before the group it uses: tearing
            # the group down under a live reducer can abort the process at exit ("terminate called
            # without an active exception"). The module's hooks form reference cycles, hence gc.
            del trainer
            gc.collect()
            if finished:  # after a failure the other ranks may never arrive
                dist.barrier()
            dist.destroy_process_group()
