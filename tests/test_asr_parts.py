"""ASR building blocks: error rates against an independent count, tokenizer, greedy CTC streaming, SpecAugment."""

import itertools
import random

import pytest
import torch

from streamssl.asr.ctc import StreamingGreedyDecoder, ctc_loss, greedy_tokens
from streamssl.asr.metrics import ErrorCounts, corpus_error_rates, edit_distance, normalize_text
from streamssl.asr.specaugment import SpecAugment
from streamssl.asr.tokenizer import Tokenizer, TokenizerError

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_distance(a, b) -> int:
    """Levenshtein by plain recursion with memo (an independent formulation)."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_matches_recursion():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert edit_distance(a, b) == _brute_distance(tuple(a), tuple(b))


def test_corpus_rates_are_pooled_not_averaged():
    refs = ["turn on the light", "hi"]
    hyps = ["turn of the light", ""]
    wer, cer = corpus_error_rates(refs, hyps)
    assert wer == pytest.approx(100 * (1 + 1) / (4 + 1))
    assert cer == pytest.approx(100 * (1 + 2) / (len("turn on the light") + 2))
    c = ErrorCounts()
    for r, h in zip(refs, hyps):
        c.add(r, h)
    assert ErrorCounts.from_tuple(c.as_tuple()).wer == c.wer


def test_normalisation_is_shared_by_ref_and_hyp():
    assert normalize_text("  Set an ALARM, for 7:30!  ") == normalize_text("set an alarm for 7 30")
    assert corpus_error_rates(["Hello, World."], ["hello world"]) == (0.0, 0.0)


def test_tokenizer_round_trip_and_errors(tmp_path):
    texts = [f"call {a} at {b} o'clock" for a, b in itertools.product(["anna", "bob", "carla", "dave"], range(1, 13))]
    tok = Tokenizer.train(texts, 40)
    assert tok.vocab_size == 40 and tok.blank_id == 40
    for t in texts[:5]:
        assert tok.decode(tok.encode(t)) == normalize_text(t)
    again = Tokenizer.load(tok.save(tmp_path / "t.model"))
    assert again.encode(texts[3]) == tok.encode(texts[3])
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(TokenizerError):
        Tokenizer.train(["a b"], 5000)


def test_streaming_greedy_equals_offline_for_any_split():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 40, 6, generator=g) * 3, -1)
    lengths = torch.tensor([40, 31, 7])
    offline = greedy_tokens(logp, lengths, blank=5)
    for cut in ([1] * 40, [8] * 5, [3, 17, 20]):
        dec = StreamingGreedyDecoder(3, blank=5)
        start = 0
        for n in cut:
            stop = min(start + n, 40)
            dec.step(logp[:, start:stop], (lengths - start).clamp(0, stop - start))
            start = stop
        assert dec.tokens == offline


def test_ctc_loss_is_finite_and_zero_infinity_for_short_inputs():
    logp = torch.log_softmax(torch.randn(2, 5, 4), -1)
    loss = ctc_loss(logp, torch.tensor([5, 2]), torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([3, 3]), blank=3)
    assert torch.isfinite(loss)


def test_specaugment_masks_only_valid_frames_and_only_in_training():
    x = torch.randn(2, 50, 80)
    lengths = torch.tensor([50, 20])
    time_only = SpecAugment(freq_masks=0, time_masks=3, time_width=8).train()
    for seed in range(20):
        y = time_only(x, lengths, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(y[1, 20:], x[1, 20:])  # padding is never a time mask
    sa = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=5).train()
    y = sa(x, lengths, generator=torch.Generator().manual_seed(1))
    assert (y == 0).any()
    assert torch.equal(sa(x, lengths, generator=torch.Generator().manual_seed(1)), y)  # a function of the seed
    sa.eval()
    assert torch.equal(sa(x, lengths), x)
