import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from streamssl.data.audio import load_audio
from streamssl.data.demo import PHONES, make_demo_corpus
from streamssl.data.manifest import load_manifest
from streamssl.ssl.features import LogMelFeatures

SMALL = dict(n_train=6, n_val=3, n_noise=6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


def all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_same_seed_same_bytes_other_seed_other_audio(corpus, tmp_path):
    again = make_demo_corpus(tmp_path / "again", seed=0, **SMALL)
    a, b = all_files(corpus.root), all_files(again.root)
    assert a.keys() == b.keys() and len(a) == 6 + 3 + 6 + 5
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    other = all_files(make_demo_corpus(tmp_path / "other", seed=1, n_train=1, n_val=1, n_noise=1).root)
    assert other["train/train_00000.wav"] != a["train/train_00000.wav"]


def test_manifests_load_and_describe_the_audio(corpus):
    train = load_manifest(corpus.train, keep_text=True)
    val = load_manifest(corpus.val)
    noise = load_manifest(corpus.noise)
    assert (len(train), len(val), len(noise)) == (6, 3, 6)
    assert ((train.durations >= 2.0) & (train.durations <= 12.0)).all()
    assert ((noise.durations >= 6.0) & (noise.durations <= 10.0)).all()
    names = {p.name for p in PHONES}
    for i in range(len(train)):
        info = sf.info(train.path(i))
        assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.channels == 1
        assert info.frames == round(train.durations[i] * 16000)
        assert set(train.text(i).split()) <= names
    align = [json.loads(line) for line in open(corpus.train_alignment)]
    for i, a in enumerate(align):
        assert a["audio_filepath"] == os.path.relpath(train.path(i), corpus.root)
        assert a["phones"][0] == a["phones"][-1] == "sil"
        assert a["starts"][0] == 0 and np.allclose(a["starts"][1:], a["ends"][:-1], atol=2e-6)
        assert abs(a["ends"][-1] - train.durations[i]) < 1.0 / 16000 + 1e-6
        assert " ".join(p for p in a["phones"] if p != "sil") == train.text(i)
    for i in range(len(noise)):
        x = load_audio(noise.path(i))
        assert 1e-3 < np.sqrt(np.mean(x ** 2)) < 0.2 and np.abs(x).max() < 1.0


def frames_and_labels(manifest, alignment, feats):
    idx = load_manifest(manifest)
    al = [json.loads(line) for line in open(alignment)]
    X, Y = [], []
    for i in range(len(idx)):
        x = torch.from_numpy(load_audio(idx.path(i)))[None]
        f, fl = feats(x, torch.tensor([x.shape[1]]))
        n = int(fl[0])
        centre = ((np.arange(n) + 1) * 160 - 200) / 16000  # centre of the causal 25 ms window
        k = np.searchsorted(np.array(al[i]["ends"]), centre, side="right").clip(max=len(al[i]["phones"]) - 1)
        X.append(f[0, :n].numpy())
        Y += [al[i]["phones"][j] for j in k]
    return np.concatenate(X), np.array(Y)


def test_phones_have_consistent_learnable_spectra(corpus):
    """A nearest-centroid frame classifier fit on train beats the majority class on val by far,
    so masked prediction of quantised frames has structure to learn."""
    feats = LogMelFeatures().eval()
    Xt, Yt = frames_and_labels(corpus.train, corpus.train_alignment, feats)
    Xv, Yv = frames_and_labels(corpus.val, corpus.val_alignment, feats)
    mu, sd = Xt.mean(0), Xt.std(0)
    Xt, Xv = (Xt - mu) / sd, (Xv - mu) / sd
    labels = sorted(set(Yt))
    centroids = np.stack([Xt[Yt == lab].mean(0) for lab in labels])
    pred = np.array(labels)[((Xv[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    accuracy = (pred == Yv).mean()
    majority = max((Yv == lab).mean() for lab in labels)
    assert accuracy > 3 * majority, (accuracy, majority)


def test_cli_demo_data(tmp_path, capsys):
    from streamssl.cli import main
    assert main(["demo-data", str(tmp_path / "c"), "--n-train", "1", "--n-val", "1", "--n-noise", "1"]) == 0
    assert "train" in capsys.readouterr().out
    assert len(load_manifest(tmp_path / "c" / "train.json")) == 1
    with pytest.raises(ValueError, match="n_train"):
        make_demo_corpus(tmp_path / "d", n_train=0)
