"""Subword tokenizer for CTC fine-tuning: sentencepiece trained on a manifest's transcripts.

At 80 ms per encoder frame, characters are too dense for CTC (a fast speaker says more than 12
characters per second), so the CTC head predicts subwords. The blank is the id after the last
piece (``blank_id == vocab_size``); sentencepiece's own ``<unk>`` stays piece 0.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .metrics import normalize_text


class TokenizerError(ValueError):
    """A tokenizer cannot be trained, loaded or used; the message names the file."""


def _spm():
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover - a dependency
        raise TokenizerError("fine-tuning needs sentencepiece: pip install sentencepiece") from None
    return sentencepiece


class Tokenizer:
    """A sentencepiece model (BPE or unigram) over normalised transcripts.

    Build one with :meth:`train` or :meth:`load`; ``encode(text) -> list[int]`` in [0, vocab_size),
    ``decode(ids) -> str``. ``blank_id`` (= vocab_size) is the CTC blank, not a piece.
    """

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        spm = _spm()
        self.source = source
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except Exception as e:
            raise TokenizerError(f"{source}: not a sentencepiece model: {e}") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Normalised ``text`` -> piece ids."""
        return list(self._sp.EncodeAsIds(normalize_text(text)))

    def decode(self, ids) -> str:
        """Piece ids (blank and out-of-range ids are dropped) -> text."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._sp.DecodeIds(ids)

    def pieces(self) -> list[str]:
        return [self._sp.IdToPiece(i) for i in range(self.vocab_size)]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.model`` file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(self.model_proto)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path} does not exist")
        return cls(path.read_bytes(), str(path))

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, model_type: str = "bpe", source: str = "transcripts") -> "Tokenizer":
        """Train on ``texts`` (normalised first).

        Args:
            texts: transcripts; empty ones are ignored.
            vocab_size: pieces including ``<unk>``; sentencepiece needs enough distinct text to
                fill it (a clear error names the largest size this text allows).
            model_type: "bpe" or "unigram".
            source: named in errors (the manifest the texts came from).
        """
        if model_type not in ("bpe", "unigram"):
            raise TokenizerError(f"tokenizer type must be bpe or unigram, got {model_type!r}")
        lines = [t for t in (normalize_text(x) for x in texts) if t]
        if not lines:
            raise TokenizerError(f"{source}: no non-empty transcript to train a tokenizer on")
        spm = _spm()
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
                num_threads=1, minloglevel=2, hard_vocab_limit=True,
            )
        except RuntimeError as e:
            raise TokenizerError(f"{source}: cannot train a {model_type} tokenizer of {vocab_size} pieces: {e}") from None
        return cls(proto.getvalue(), source)
