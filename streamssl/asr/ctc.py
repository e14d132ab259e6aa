"""CTC head, loss and greedy decoding (offline and chunk by chunk).

Greedy CTC streams exactly: the best token of a frame depends on that frame alone, and collapsing
repeats needs only the previous frame's token, so decoding a chunk at a time with that one token
carried over yields the offline token sequence, hence identical text.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CTCHead(nn.Module):
    """Linear map from encoder frames to log-probabilities over ``vocab_size`` pieces + blank (last).

    Args:
        d_model: encoder width D. vocab_size: pieces V (the blank is id V).
    """

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.proj = nn.Linear(d_model, vocab_size + 1)

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        """(B, T', D) -> (B, T', V + 1) float32 log-probabilities."""
        logits = self.proj(encoded)
        return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
             blank: int) -> torch.Tensor:
    """Mean over utterances of the CTC loss divided by each target length (NeMo's default).

    Args:
        log_probs: (B, T', V + 1) float32. lengths: (B,) int64 valid frames.
        targets: (B, S) int64 padded piece ids. target_lengths: (B,) int64.
    Returns:
        scalar float32. Utterances too short for their transcript give +inf inside torch's CTC;
        ``zero_infinity`` drops them from the gradient (the trainer counts them).
    """
    loss = F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=blank,
                      reduction="none", zero_infinity=True)
    return (loss / target_lengths.clamp(min=1).to(loss.dtype)).mean()


def greedy_tokens(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Offline greedy CTC: per row, argmax per frame, repeats collapsed, blanks removed.

    Args:
        log_probs: (B, T', V + 1). lengths: (B,) valid frames.
    Returns:
        B lists of piece ids.
    """
    best = log_probs.argmax(-1).cpu()
    out = []
    for b, n in enumerate(lengths.tolist()):
        seq, prev = [], blank
        for t in best[b, :n].tolist():
            if t != prev and t != blank:
                seq.append(t)
            prev = t
        out.append(seq)
    return out


class StreamingGreedyDecoder:
    """Greedy CTC over chunks: ``step(log_probs, lengths)`` appends each row's new pieces.

    Carries each row's last frame token between chunks, so the pieces equal ``greedy_tokens`` on
    the concatenated frames.
    """

    def __init__(self, batch_size: int, blank: int):
        self.blank = blank
        self.prev = [blank] * batch_size
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]

    def step(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Consume (B, n, V + 1) new frames, (B,) valid counts; returns the pieces each row added."""
        best = log_probs.argmax(-1).cpu()
        added = []
        for b, n in enumerate(lengths.tolist()):
            new = []
            for t in best[b, :n].tolist():
                if t != self.prev[b] and t != self.blank:
                    new.append(t)
                self.prev[b] = t
            self.tokens[b].extend(new)
            added.append(new)
        return added
