"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard (if installed), a tqdm bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class RunLog:
    """Rank 0's record of a run.

    ``metrics.jsonl`` holds one JSON object per logged step. A fresh run starts a fresh file; a
    resumed one drops the lines logged after the checkpoint it resumes from (they are logged
    again, identically, because resume is exact).
    """

    def __init__(self, out_dir: Path, *, enabled: bool, step: int, max_steps: int, desc: str, progress: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = self.bar = None
        if not enabled:
            return
        if self.path.exists():
            if step == 0:
                self.path.unlink()
            else:
                keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
                self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.writer = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def tick(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})

    def say(self, message: str) -> None:
        """A line for the user that does not tear the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (a clear error when it is missing or corrupt)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a streamssl run directory?)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e.msg}") from None
    return out
