"""``streamssl plot RUN_DIR``: training and validation curves of a run as PNG files (matplotlib).

One figure per group of metrics that share a scale, each written next to the run's metrics:
``loss.png`` (training and validation loss, with the input-blind baselines of a pretraining run),
``accuracy.png`` (pretraining), ``error_rates.png`` (fine-tuning WER/CER), ``lr.png``.
"""

from __future__ import annotations

from pathlib import Path

from streamssl.train.runlog import read_metrics

FIGURES = {
    "loss": ["loss", "val_loss", "val_marginal_ce", "val_prior_ce"],
    "accuracy": ["acc", "val_acc", "val_majority_acc"],
    "error_rates": ["val_wer", "val_cer"],
    "effective_rank": ["val_effective_rank"],
    "lr": ["lr"],
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per figure that has data; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("streamssl plot needs matplotlib: pip install 'streamssl[plot]'") from None
    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in FIGURES.items():
        series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, pts in series.items():
            style = "--" if k in ("val_marginal_ce", "val_prior_ce", "val_majority_acc") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o" if len(pts) < 30 else None,
                    label=k)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(run_dir).name}: {name.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
