"""Fine-tuning and transcription end to end: init, resume, freezing, streaming == offline, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamssl.asr.model import load_ctc_model
from streamssl.checkpoint import CheckpointError
from streamssl.config import ConfigError, load_config, load_finetune_config
from streamssl.data.manifest import ManifestError
from streamssl.train import pretrain
from streamssl.train.finetuning import finetune, finetune_trainer
from streamssl.transcribe import read_inputs, transcribe_offline, transcribe_streaming

ENC = ["model.encoder.d_model=48", "model.encoder.n_layers=2", "model.encoder.n_heads=2",
       "model.encoder.subsampling_channels=16"]
QUIET = ["trainer.progress=false", "trainer.log_every=1", "data.batch_seconds=30", "model.tokenizer.vocab_size=48"]


def _ft(corpus, *extra):
    return load_finetune_config("finetune_demo", ENC + QUIET + [
        f"data.train_manifest={corpus.train}", f"data.val_manifest={corpus.val}", *extra])


def _metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(small_speech, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = load_config("ssl_demo", ENC + ["trainer.progress=false", "data.batch_seconds=30", "trainer.max_steps=3",
                                         "trainer.val_every=3", f"data.train_manifest={small_speech.pretrain}",
                                         f"data.val_manifest={small_speech.val}",
                                         f"data.noise_manifest={small_speech.noise}"])
    pretrain(cfg, out)
    return out


@pytest.fixture(scope="module")
def finetuned(small_speech, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    finetune(_ft(small_speech, "trainer.max_steps=40", "trainer.val_every=20", "optim.warmup_steps=10",
                 "optim.lr=3e-3"), out, init=str(pretrained))
    return out


def test_finetune_logs_error_rates_and_saves_a_complete_model(finetuned):
    m = _metrics(finetuned)
    vals = [r for r in m if "val_wer" in r]
    assert [r["step"] for r in vals] == [20, 40]
    assert all(np.isfinite(r["loss"]) for r in m)
    assert m[-1]["loss"] < m[0]["loss"]
    assert (finetuned / "tokenizer.model").is_file()
    model, tok = load_ctc_model(finetuned)
    assert tok.vocab_size == 48 and model.head.vocab_size == 48 and not model.training


def test_init_loads_the_pretrained_encoder_and_features(small_speech, pretrained, tmp_path):
    from streamssl.export import load_encoder

    enc, feats = load_encoder(pretrained / "checkpoints" / "last.pt", with_features=True)
    trainer = finetune_trainer(_ft(small_speech, "trainer.max_steps=1"), tmp_path / "ft", init=str(pretrained))
    for k, v in enc.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(trainer.model.encoder.state_dict()[k], v), k
    assert torch.equal(trainer.model.features.mean, feats.mean)


def test_frozen_encoder_steps_leave_the_encoder_bit_identical(small_speech, pretrained, tmp_path):
    trainer = finetune_trainer(_ft(small_speech, "trainer.max_steps=2", "optim.freeze_encoder_steps=2",
                                   "optim.warmup_steps=1"), tmp_path / "ft", init=str(pretrained))
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.proj.weight"], after["head.proj.weight"])


def test_resume_is_exact(small_speech, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    base = ["optim.warmup_steps=2", "trainer.ckpt_every=2"]
    finetune(_ft(small_speech, *base, "trainer.max_steps=4"), full)
    finetune(_ft(small_speech, *base, "trainer.max_steps=2"), split)
    finetune(_ft(small_speech, *base, "trainer.max_steps=4"), split)
    assert [r["loss"] for r in _metrics(full)] == [r["loss"] for r in _metrics(split)]


def test_streaming_transcripts_equal_offline(finetuned, small_speech):
    model, tok = load_ctc_model(finetuned)
    items, has_text = read_inputs([], small_speech.test)
    assert has_text
    # 40 steps of CTC emit blanks from a nearly constant encoder output. A random head applied to
    # the output minus its mean makes every frame's argmax depend on what differs between frames,
    # so the comparison covers many tokens; float64 keeps near-ties from flipping on rounding.
    model.double()
    with torch.no_grad():
        audio = torch.from_numpy(np.concatenate([_audio(it) for it in items[:3]])).double()
        feats, lengths = model.features(audio[None], torch.tensor([audio.numel()]))
        mean = model.encoder(feats, lengths)[0][0].mean(0)
        model.head.proj.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        model.head.proj.bias.copy_(-model.head.proj.weight @ mean)
    offline = transcribe_offline(model, tok, items)
    for chunks in (1, 3):
        streamed, steps = transcribe_streaming(model, tok, items, chunks_per_step=chunks)
        assert streamed == offline and len(steps) > 0
    assert sum(len(h) for h in offline) > 5 * len(items)  # many tokens: not vacuous


def test_streaming_equals_offline_with_lookahead(small_speech, tmp_path):
    out = tmp_path / "la"
    finetune(_ft(small_speech, "trainer.max_steps=3", "model.encoder.att_context_size=[4,1]"), out)
    model, tok = load_ctc_model(out)
    items, _ = read_inputs([], small_speech.test)
    assert transcribe_streaming(model, tok, items[:4])[0] == transcribe_offline(model, tok, items[:4])


def _audio(item):
    from streamssl.data.audio import load_audio

    return load_audio(item["_path"])


def _cli(args, cwd=None):
    return subprocess.run([sys.executable, "-m", "streamssl.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_transcribe_cli_scores_a_manifest_and_writes_predictions(finetuned, small_speech, tmp_path):
    out = tmp_path / "preds.jsonl"
    res = _cli(["transcribe", "--model", str(finetuned), "--manifest", small_speech.test, "--out", str(out)])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("WER ") and " CER " in lines[-1]
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    src = [json.loads(x) for x in Path(small_speech.test).read_text().splitlines()]
    assert len(preds) == len(src) == len(lines) - 1
    from streamssl.asr.metrics import corpus_error_rates

    wer, cer = corpus_error_rates([p["text"] for p in preds], [p["pred_text"] for p in preds])
    assert lines[-1] == f"WER {wer:.2f} CER {cer:.2f}"
    assert all(p["audio_filepath"] == s["audio_filepath"] for p, s in zip(preds, src))


def test_bad_inputs_get_clear_errors(finetuned, pretrained, small_speech, tmp_path):
    no_text = tmp_path / "no_text.json"
    rows = [json.loads(x) for x in Path(small_speech.train).read_text().splitlines()[:3]]
    rows[1].pop("text")
    base = Path(small_speech.train).parent
    no_text.write_text("".join(json.dumps({**r, "audio_filepath": str(base / r["audio_filepath"])}) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"no_text.json:2: missing key 'text'"):
        finetune(_ft(small_speech, f"data.train_manifest={no_text}", "trainer.max_steps=1"), tmp_path / "a")
    rows[1]["text"] = "  "
    no_text.write_text("".join(json.dumps({**r, "audio_filepath": str(base / r["audio_filepath"])}) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"no_text.json:2: 'text' must be a non-empty transcript"):
        finetune(_ft(small_speech, f"data.train_manifest={no_text}", "trainer.max_steps=1"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="--init"):
        finetune(_ft(small_speech, "trainer.max_steps=1"), tmp_path / "c", init=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="model.encoder.att_context_size"):
        finetune(_ft(small_speech, "trainer.max_steps=1", "model.encoder.att_context_size=[-1,2]"), tmp_path / "d",
                 init=str(pretrained), context_override=True)
    with pytest.raises(CheckpointError, match="no CTC head"):
        load_ctc_model(pretrained)
    with pytest.raises(ConfigError, match="model.tokenizer.vocab_size"):  # the run's tokenizer has 48 pieces
        finetune(_ft(small_speech, "trainer.max_steps=41", "model.tokenizer.vocab_size=40"), finetuned)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(400, dtype=np.float32), 16000)
    res = _cli(["transcribe", "--model", str(finetuned), str(short)])
    assert res.returncode == 1 and "short.wav" in res.stderr and "shorter than one encoder frame" in res.stderr
    res = _cli(["transcribe", "--model", str(finetuned)])
    assert res.returncode == 1 and "no input" in res.stderr
    res = _cli(["finetune", "--out", str(tmp_path / "e"), "model.tokenizer.vocab_sise=3"])
    assert res.returncode == 1 and "model.tokenizer.vocab_size" in res.stderr
