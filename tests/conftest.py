"""Shared pytest configuration and fixtures.

* Tests marked ``cuda`` skip cleanly on machines without a GPU.
* ``one_thread``: tiny-tensor tests run faster on one thread and do not fight the rest of the
  suite for the two cores (``pytestmark = pytest.mark.usefixtures("one_thread")``).
* ``load_emulated(name)`` / ``emu_default_schedule``: the CUDA-emulator test libraries.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_emulated(name: str):
    """The emulator test library built from tests/cuda_emu/<name>; skips without a C++ compiler."""
    from cuda_emu import CompilerNotFound, load

    try:
        return load(name)
    except CompilerNotFound as e:
        pytest.skip(f"no C++ compiler for the CUDA emulator: {e}")


@pytest.fixture
def emu_default_schedule(emu, monkeypatch):
    """Every emulator test starts from the default schedule, whatever the environment says
    (each emulator test module defines its own ``emu`` library fixture)."""
    monkeypatch.delenv("CUDA_EMU_SCHEDULE", raising=False)
    emu.set_schedule(None)
    yield
    emu.set_schedule(None)


@pytest.fixture(scope="session")
def small_speech(tmp_path_factory):
    """A small transcribed eSpeak NG corpus (same generator as the demo's, fewer utterances)."""
    from streamssl.data.speech_corpus import make_speech_corpus

    # espeakng-loader is a core dependency: a synthesiser that fails here is a failure, not a skip.
    return make_speech_corpus(tmp_path_factory.mktemp("speech"), seed=0, n_pretrain=60, n_train=48, n_val=12,
                              n_test=40, n_noise=2)
