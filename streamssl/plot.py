"""``streamssl plot RUN_DIR``: training and validation curves of a run as PNG files (matplotlib).

One figure per group of metrics that share a scale, each written next to the run's metrics:
``loss.png`` (training and validation loss, with the input-blind baselines of a pretraining run),
``accuracy.png`` (pretraining), ``error_rates.png`` (fine-tuning WER/CER), ``lr.png``; for a
pretraining run also ``utterance.png``: one validation utterance's log-mel, the frames the masked
objective would hide, and the target tokens the quantizer gives it.
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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("streamssl plot needs matplotlib: pip install 'streamssl[plot]'") from None
    return plt


def plot_utterance(run_dir: str | Path, out_path: str | Path) -> Path | None:
    """Log-mel, mask and target tokens of the first validation utterance of a pretraining run
    (None for a run without a pretraining checkpoint or validation manifest)."""
    import torch
    from omegaconf import OmegaConf

    from streamssl.checkpoint import load_checkpoint
    from streamssl.data.audio import load_audio
    from streamssl.data.manifest import load_manifest
    from streamssl.ssl.nest import NEST

    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return None
    state = load_checkpoint(ckpt)
    if "format" in state:  # a fine-tuning checkpoint: no quantizer to show
        return None
    cfg = OmegaConf.create(state["config"])
    val = cfg.data.val_manifest or (Path(run_dir) / "demo_data" / "val.json")
    if not Path(str(val)).is_file():
        return None
    index = load_manifest(str(val))
    model = NEST(cfg.model, seed=cfg.trainer.seed)
    model.load_state_dict(state["model"], strict=False)  # the plot needs features, masking, quantizer only
    model.eval()
    audio = torch.from_numpy(load_audio(index.path(0), float(index.offsets[0]), float(index.durations[0])))[None]
    lengths = torch.tensor([audio.shape[1]])
    with torch.no_grad():
        feats, feat_len = model.features(audio, lengths)
        _, mask = model.masking(feats, feat_len)
        clean, _ = model.target_features(audio, lengths)
        tokens, _ = model.quantizer(clean, feat_len)
    plt = _pyplot()
    fig, (a1, am, a2) = plt.subplots(3, 1, figsize=(10, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [4, 0.6, 1.4]})
    a1.imshow(feats[0].T.numpy(), origin="lower", aspect="auto", cmap="magma")
    a1.set_ylabel("mel bin")
    a1.set_title(f"{Path(index.path(0)).name}: encoder input, the masked objective's blocks, target tokens")
    am.fill_between(range(mask.shape[1]), mask[0].numpy().astype(float), step="mid", color="grey")
    am.set_yticks([])
    am.set_ylabel("mask")
    t = tokens[0, :, 0].numpy()
    a2.step([8 * j + 4 for j in range(len(t))], t, where="mid")
    a2.set_ylabel("token")
    a2.set_xlabel("feature frame (10 ms)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per figure that has data; returns the paths written."""
    plt = _pyplot()
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
    utt = plot_utterance(run_dir, out / "utterance.png")
    return written + ([utt] if utt else [])
