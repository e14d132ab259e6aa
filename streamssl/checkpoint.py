"""Checkpoints: atomic writes, the last N kept, safe loading and clear mismatch errors."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not fit the model; the message says which keys."""


_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, ckpt_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Write ``step-<step>.pt`` and ``last.pt`` atomically; delete step files beyond ``keep_last``.

    Returns the path of the step file.
    """
    ckpt_dir = Path(ckpt_dir)
    step_path = ckpt_dir / f"step-{step:08d}.pt"
    atomic_save(state, step_path)
    atomic_save(state, ckpt_dir / "last.pt")
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name)))
    for _, old in steps[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return step_path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """``module.load_state_dict(state)`` with one message naming every mismatched key.

    Raises:
        CheckpointError listing missing keys, unexpected keys and shape mismatches, e.g. when a
        checkpoint of another model size is loaded.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"{source} does not fit this model (another model size or recipe?): " + "; ".join(parts))
    module.load_state_dict(state)
