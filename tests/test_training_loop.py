"""The shared training loop: non-finite steps, resume with a changed config, weight decay groups,
batches whose every file is unreadable, the logged learning rate."""

import json
from pathlib import Path

import pytest
import torch

from streamssl.checkpoint import CheckpointError
from streamssl.config import load_config
from streamssl.data.demo import make_demo_corpus
from streamssl.train import pretrain_trainer
from streamssl.train.loop import decay_param_groups
from streamssl.train.schedule import noam_lambda

FAST = ["model.encoder.d_model=32", "model.encoder.n_layers=1", "model.encoder.n_heads=2",
        "model.encoder.subsampling_channels=8", "model.quantizer.num_codes=64", "data.batch_seconds=16",
        "trainer.progress=false", "trainer.log_every=1", "data.num_workers=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), n_train=24, n_val=4, n_noise=2)


def _cfg(corpus, *extra):
    return load_config("demo", FAST + [f"data.train_manifest={corpus.train}", f"data.val_manifest={corpus.val}",
                                       f"data.noise_manifest={corpus.noise}", *extra])


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_changes_no_weight_and_is_counted(corpus, tmp_path):
    trainer = pretrain_trainer(_cfg(corpus, "trainer.max_steps=3", "trainer.val_every=100"), tmp_path / "run")
    task = trainer.task
    real = task.forward

    def poisoned(module, raw, generator):
        out = real(module, raw, generator)
        if trainer.step == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    task.forward = poisoned
    trainer.train_step(trainer._batches())
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    m = trainer.train_step(trainer._batches())
    assert m["nonfinite"] == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert trainer.train_step(trainer._batches())["nonfinite"] == 0


def test_too_many_nonfinite_steps_stop_the_run_without_a_bad_checkpoint(corpus, tmp_path):
    trainer = pretrain_trainer(_cfg(corpus, "trainer.max_steps=10", "trainer.max_nonfinite_steps=2",
                                    "trainer.ckpt_every=1"), tmp_path / "run")
    real = trainer.task.forward
    trainer.task.forward = lambda *a: {**real(*a), "loss": real(*a)["loss"] * float("inf")}
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        trainer.fit()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite weights"):
        trainer.save()


def test_resume_refuses_changes_that_break_exactness_and_allows_cadence(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_trainer(_cfg(corpus, "trainer.max_steps=2"), out).fit()
    with pytest.raises(CheckpointError, match=r"optim.lr: 0.002 -> 0.001"):
        pretrain_trainer(_cfg(corpus, "trainer.max_steps=4", "optim.lr=1e-3"), out)
    with pytest.raises(CheckpointError, match=r"trainer.seed"):
        pretrain_trainer(_cfg(corpus, "trainer.max_steps=4", "trainer.seed=7"), out)
    pretrain_trainer(_cfg(corpus, "trainer.max_steps=4", "trainer.log_every=2"), out).fit()
    assert "trainer.max_steps: 2 -> 4" in capsys.readouterr().err


def test_weight_decay_only_on_linear_and_conv_weights():
    from streamssl.nn.encoder import FastConformerEncoder

    enc = FastConformerEncoder(feat_in=80, d_model=32, n_layers=1, n_heads=2, subsampling_channels=8)
    decayed, kept = decay_param_groups({"encoder": enc}, 0.1)
    names = {id(p): n for n, p in enc.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert not any("pos_bias" in names[id(p)] or names[id(p)].endswith("bias") for p in decayed["params"])
    assert any("pos_bias" in names[id(p)] for p in kept["params"])
    assert len(decayed["params"]) + len(kept["params"]) == len(list(enc.parameters()))


def test_logged_lr_is_the_rate_the_step_used(corpus, tmp_path):
    out = tmp_path / "run"
    pretrain_trainer(_cfg(corpus, "trainer.max_steps=3", "optim.warmup_steps=10"), out).fit()
    f = noam_lambda(10, 2e-3, 1e-6)
    assert [r["lr"] for r in _metrics(out)] == pytest.approx([2e-3 * f(s) for s in range(3)])


def test_an_all_unreadable_batch_goes_through_the_model(corpus, tmp_path):
    trainer = pretrain_trainer(_cfg(corpus, "trainer.max_steps=2", "model.objective.kind=masked"), tmp_path / "run")
    calls_before = trainer.model.masking.calls
    calls = []
    real = trainer.task.forward
    trainer.task.forward = lambda module, raw, gen: calls.append(raw["audio"].shape) or real(module, raw, gen)
    empty = {"audio": torch.zeros(0, 0), "audio_lengths": torch.zeros(0, dtype=torch.int64), "skipped": ["x"],
             "indices": torch.zeros(0, dtype=torch.int64)}
    m = trainer.train_step(iter([empty]))
    assert calls and m["num_targets"] == 0 and m["skipped"] == 1 and m["nonfinite"] == 0
    assert trainer.model.masking.calls == calls_before + 1  # the masking counter moved on, as on other ranks


def test_logged_losses_name_what_they_average(corpus, tmp_path):
    out = tmp_path / "run"
    pretrain_trainer(_cfg(corpus, "trainer.max_steps=2", "trainer.accumulate_grad_batches=2"), out).fit()
    for r in _metrics(out):
        assert r["loss"] > 0 and r["loss_optimised"] > 0
    one = tmp_path / "one"
    pretrain_trainer(_cfg(corpus, "trainer.max_steps=2"), one).fit()
    # One micro-batch: both are the same float32 loss, one of them through (x * w) / w in float64.
    assert all(r["loss"] == pytest.approx(r["loss_optimised"], rel=1e-12) for r in _metrics(one))


def test_no_noise_manifest_is_said_once_at_start(corpus, tmp_path, capsys):
    cfg = load_config("demo", FAST + [f"data.train_manifest={corpus.train}", "trainer.max_steps=1"])
    pretrain_trainer(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert err.count("no data.noise_manifest") == 1
    pretrain_trainer(load_config("demo", FAST + [f"data.train_manifest={corpus.train}", "trainer.max_steps=1",
                                                 "model.augment.prob=0"]), tmp_path / "clean")
    assert "no data.noise_manifest" not in capsys.readouterr().err


def test_global_statistics_file_is_loaded_and_checked(corpus, tmp_path):
    """model.features.stats: `compute-stats --config` writes it, the trainer loads it into the
    encoder-input features (and so into checkpoints); a missing file, one made with other feature
    settings, or a file without normalize=global is refused naming the key."""
    from streamssl.cli import main
    from streamssl.config import ConfigError

    stats = tmp_path / "stats.json"
    assert main(["compute-stats", str(corpus.train), str(stats), "--config", "demo"]) == 0
    saved = json.loads(stats.read_text())
    trainer = pretrain_trainer(_cfg(corpus, "trainer.max_steps=1", "model.features.normalize=global",
                                    f"model.features.stats={stats}"), tmp_path / "run")
    assert torch.equal(trainer.model.features.mean, torch.tensor(saved["mean"], dtype=torch.float32))
    assert not torch.equal(trainer.model.features.std, torch.ones_like(trainer.model.features.std))
    trainer.fit()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert any(torch.equal(v, trainer.model.features.mean) for k, v in ckpt["model"].items() if k.endswith("mean"))

    with pytest.raises(ValueError, match=r"model.features.stats: .*missing.json"):
        pretrain_trainer(_cfg(corpus, "model.features.normalize=global",
                              f"model.features.stats={tmp_path / 'missing.json'}"), tmp_path / "r2")
    other = tmp_path / "other.json"
    assert main(["compute-stats", str(corpus.train), str(other), "--set", "model.features.hop_length=128"]) == 0
    with pytest.raises(ValueError, match=r"model.features.stats: .*hop_length"):
        pretrain_trainer(_cfg(corpus, "model.features.normalize=global", f"model.features.stats={other}"),
                         tmp_path / "r3")
    with pytest.raises(ConfigError, match=r"model.features.stats"):
        _cfg(corpus, "model.features.normalize=none", f"model.features.stats={stats}")
