"""Where one NEST pretraining step spends its time: a per-stage torch.profiler table (CPU).

    PYTHONPATH=$PWD python bench/profile_step.py --config seed --steps 3 --threads 2

Builds the NEST model at ``--config`` (``seed``: d 176, 4 layers, 4 heads; ``large``: d 512, 17
layers, 8 heads; both the small recipe otherwise: causal, 256 subsampling channels, K 9,
augmentation off) with the trainer's optimiser, feeds it B = 8 x 4 s of random audio, and
profiles ``--steps`` steps after one warm-up. Each stage is a ``record_function`` range put around
the module or call that does it (nothing in streamssl is changed), and its time is the range's
CPU total per step:

  features            the two log-mel front ends (clean targets' and the encoder input's)
  quantizer/targets   the frozen random-projection quantizer
  masking             block masking and the target-frame selection
  subsampling         the 8x causal subsampling
  layers              the conformer blocks, split into attention (projections, scores,
                      softmax, output), conv module, feed-forward (both halves) and the rest
                      (LayerNorms, residuals, dropout)
  head + loss         prediction head at the scored frames and cross-entropy
  backward            loss.backward()
  optimiser           AdamW step and zero_grad
  other               step time not in a range (encoder masks and positions, target gathering, ...)

The backward is one range (autograd runs the whole graph in it); its heaviest autograd nodes are
listed below the table. Wall time per step is measured again without the profiler.

To profile an older commit, give it a worktree of its own and run this file from here with
PYTHONPATH pointing at that worktree (the script uses only APIs both sides have):

    git worktree add /tmp/before <commit> && PYTHONPATH=/tmp/before python bench/profile_step.py ...

``--json PATH`` writes the numbers as JSON. Freed host memory is kept in the process as the
trainer does (train/host_memory.py); ``PROFILE_HOST_MEMORY=default`` leaves glibc's defaults.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

CONFIGS = {
    "seed": dict(d_model=176, n_layers=4, n_heads=4),
    "large": dict(d_model=512, n_layers=17, n_heads=8),
}
B, SECONDS, SR = 8, 4.0, 16000
LAYER_PARTS = ("attention", "conv", "feed-forward")


def _ranged(fn, label):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def _wrap(obj, attr, label):
    """Put a record_function range around obj.attr (an instance attribute shadows the method)."""
    setattr(obj, attr, _ranged(getattr(obj, attr), label))


def build(config: str):
    import streamssl.ssl.nest as nest_mod
    from streamssl.config import load_config
    from streamssl.train import loop

    c = CONFIGS[config]
    # The trainer keeps freed host memory on CPU where the checkout has it (train/host_memory.py).
    try:
        from streamssl.train.host_memory import keep_freed_host_memory
    except ImportError:
        keep_freed_host_memory = None
    if keep_freed_host_memory is not None and os.environ.get("PROFILE_HOST_MEMORY", "keep") == "keep":
        keep_freed_host_memory()
    over = ["data.train_manifest=unused", "model.augment.prob=0.0"] + [f"model.encoder.{k}={v}" for k, v in c.items()]
    cfg = load_config("small", over)
    torch.manual_seed(0)
    model = nest_mod.NEST(cfg.model, seed=0).train()
    groups = loop.decay_param_groups({"model": model}, cfg.optim.weight_decay)
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    # The trainer's optimiser: loop._adamw where the checkout has it (fused AdamW), else plain AdamW.
    adamw = getattr(loop, "_adamw", None)
    opt = adamw(groups, **kwargs) if adamw else torch.optim.AdamW(groups, **kwargs)
    fused = bool(opt.defaults.get("fused"))

    for name in ("features", "target_features"):
        _wrap(getattr(model, name), "forward", "stage: features")
    _wrap(model.quantizer, "forward", "stage: quantizer/targets")
    _wrap(model.masking, "forward", "stage: masking")
    _wrap(model.masking, "target_mask", "stage: masking")
    _wrap(model.encoder.subsampling, "forward", "stage: subsampling")
    for block in model.encoder.layers:
        _wrap(block, "forward", "stage: layers")
        for attr in ("project_kv", "project_pos", "attend"):
            _wrap(block.attn, attr, "layer: attention")
        _wrap(block.conv, "forward", "layer: conv")
        _wrap(block.ff1, "forward", "layer: feed-forward")
        _wrap(block.ff2, "forward", "layer: feed-forward")
    _wrap(model.head, "forward", "stage: head + loss")
    nest_mod.masked_prediction_loss = _ranged(nest_mod.masked_prediction_loss, "stage: head + loss")
    return model, opt, fused


def make_step(model, opt, precision: str = "fp32"):
    """One training step on a fixed batch; precision "bf16" runs it under CPU bfloat16 autocast, as
    trainer.precision=bf16 does on a CPU."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    g = torch.Generator().manual_seed(0)
    n = int(SR * SECONDS)
    audio = 0.1 * torch.randn(B, n, generator=g)
    lengths = torch.full((B,), n, dtype=torch.int64)

    def step():
        with autocast:
            out = model(audio, lengths, generator=torch.Generator().manual_seed(0))
        with torch.profiler.record_function("stage: backward"):
            out["loss"].backward()
        with torch.profiler.record_function("stage: optimiser"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def profile(config: str, steps: int, precision: str = "fp32") -> dict:
    model, opt, fused = build(config)
    step = make_step(model, opt, precision)
    step()  # warm-up: optimiser state, allocator, the C++ extension
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        profiled = (time.perf_counter() - t0) / steps
    ms = {}
    nodes = {}
    for e in prof.key_averages():
        if e.key.startswith(("stage: ", "layer: ")):
            ms[e.key.split(": ", 1)[1]] = e.cpu_time_total / 1e3 / steps
        elif e.key.startswith("autograd::engine::evaluate_function: "):
            nodes[e.key.split(": ", 1)[1]] = e.cpu_time_total / 1e3 / steps
    ms["layers: rest"] = ms.get("layers", 0.0) - sum(ms.get(p, 0.0) for p in LAYER_PARTS)
    top = ("features", "quantizer/targets", "masking", "subsampling", "layers", "head + loss", "backward", "optimiser")
    ms["other"] = 1e3 * profiled - sum(ms.get(k, 0.0) for k in top)
    return {
        "config": config, "precision": precision, "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps,
        "fused_adamw": fused, "wall_ms_median": 1e3 * statistics.median(walls), "profiled_ms": 1e3 * profiled,
        "stages_ms": ms, "backward_nodes_ms": dict(sorted(nodes.items(), key=lambda kv: -kv[1])[:8]),
    }


def table(r: dict) -> str:
    s, total = r["stages_ms"], r["profiled_ms"]
    rows = [("features", s.get("features")), ("quantizer/targets", s.get("quantizer/targets")),
            ("masking", s.get("masking")), ("subsampling", s.get("subsampling")),
            ("conformer layers", s.get("layers")), ("  attention", s.get("attention")),
            ("  conv module", s.get("conv")), ("  feed-forward", s.get("feed-forward")),
            ("  norms, residuals, dropout", s.get("layers: rest")), ("head + loss", s.get("head + loss")),
            ("backward", s.get("backward")), ("optimiser", s.get("optimiser")), ("other", s.get("other"))]
    lines = [f"{r['config']}: {r['threads']} threads, {r.get('precision', 'fp32')}, fused AdamW {r['fused_adamw']}, "
             f"step {r['wall_ms_median']:.0f} ms (median of {r['steps']}, no profiler), {total:.0f} ms profiled",
             "| stage | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / total:.1f} % |" for k, v in rows if v is not None]
    lines.append("heaviest backward nodes (ms / step): " +
                 ", ".join(f"{k} {v:.0f}" for k, v in r["backward_nodes_ms"].items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="seed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: the step under CPU bfloat16 autocast (trainer.precision=bf16)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r = profile(a.config, a.steps, a.precision)
    print(table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
