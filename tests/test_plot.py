"""`streamssl plot`: curves and the utterance figure of a run; a clear error for a non-run."""

import pytest

pytest.importorskip("matplotlib", reason="streamssl plot needs the optional matplotlib: pip install 'streamssl[plot]'")

from streamssl.cli import main  # noqa: E402
from streamssl.config import load_config  # noqa: E402
from streamssl.data.demo import make_demo_corpus  # noqa: E402
from streamssl.train import pretrain  # noqa: E402


def test_plot_writes_the_figures_of_a_pretraining_run(tmp_path, capsys):
    c = make_demo_corpus(tmp_path / "demo", n_train=12, n_val=3, n_noise=1)
    run = tmp_path / "run"
    pretrain(load_config("demo", ["model.encoder.d_model=32", "model.encoder.n_layers=1", "model.encoder.n_heads=2",
                                  "model.encoder.subsampling_channels=8", "model.quantizer.num_codes=64",
                                  "trainer.progress=false", "trainer.max_steps=2", "trainer.val_every=2",
                                  "trainer.log_every=1", f"data.train_manifest={c.train}",
                                  f"data.val_manifest={c.val}", f"data.noise_manifest={c.noise}"]), run)
    assert main(["plot", str(run)]) == 0
    for name in ("loss", "accuracy", "effective_rank", "lr", "utterance"):
        png = run / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "no metrics" in capsys.readouterr().err
