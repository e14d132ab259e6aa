"""Word and character error rates, corpus level, from an edit distance written here.

``normalize_text`` is applied to references and hypotheses alike: lower case, everything but letters,
digits and apostrophes becomes a space, runs of spaces collapse. WER = word edit operations / reference
words; CER = character edit operations / reference characters (spaces between words count as
characters, as in NeMo's CER).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NON_WORD = re.compile(r"[^a-z0-9']+")


def normalize_text(text: str) -> str:
    """Lower case; anything but ``[a-z0-9']`` becomes a space; spaces collapse; stripped."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions cost 1).

    O(len(ref) * len(hyp)) time, O(len(hyp)) memory.
    """
    if len(ref) < len(hyp):  # keep the row short
        ref, hyp = hyp, ref
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass
class ErrorCounts:
    """Running corpus-level error counts; ``add(ref, hyp)`` per utterance, then ``wer`` / ``cer``."""

    word_errors: int = 0
    words: int = 0
    char_errors: int = 0
    chars: int = 0
    utterances: int = 0

    def add(self, ref: str, hyp: str) -> None:
        ref, hyp = normalize_text(ref), normalize_text(hyp)
        self.word_errors += edit_distance(ref.split(), hyp.split())
        self.words += len(ref.split())
        self.char_errors += edit_distance(ref, hyp)
        self.chars += len(ref)
        self.utterances += 1

    def merge(self, other: "ErrorCounts") -> None:
        for k in self._FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    _FIELDS = ("word_errors", "words", "char_errors", "chars", "utterances")

    def as_tuple(self) -> tuple[int, ...]:
        """The counts, for summing across processes (``from_tuple`` undoes it)."""
        return tuple(getattr(self, k) for k in self._FIELDS)

    @classmethod
    def from_tuple(cls, values) -> "ErrorCounts":
        return cls(**{k: int(round(v)) for k, v in zip(cls._FIELDS, values)})

    @property
    def wer(self) -> float:
        """Word error rate in percent (0 for an empty reference set)."""
        return 100.0 * self.word_errors / max(self.words, 1)

    @property
    def cer(self) -> float:
        """Character error rate in percent."""
        return 100.0 * self.char_errors / max(self.chars, 1)


def corpus_error_rates(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """(WER, CER) in percent over paired lists of references and hypotheses."""
    if len(refs) != len(hyps):
        raise ValueError(f"refs and hyps differ in length: {len(refs)} vs {len(hyps)}")
    counts = ErrorCounts()
    for r, h in zip(refs, hyps):
        counts.add(r, h)
    return counts.wer, counts.cer
