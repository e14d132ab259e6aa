"""NEST's noise / speech mixing augmentation, vectorised over the batch on its device.

For each utterance b (length L_b), independently:

* with probability ``prob`` [0.5] it is mixed, else left untouched;
* a mixed utterance gets noise with probability ``noise_prob`` [0.5] at an SNR drawn from
  U[``noise_snr``] [(-5, 20) dB], otherwise another utterance of the batch (never itself) at
  U[``speech_snr``] [(-5, 5) dB]. Noise is chosen only where a noise crop is available
  (``noise_lengths[b] > 0``); otherwise the utterance is mixed with speech. A batch of one, with
  no noise, is left clean;
* the interference covers one contiguous segment ``[s, s + floor(segment_ratio * L_b))``
  (``segment_ratio`` [0.5], s uniform), read circularly from a uniform start in the source, so a
  short noise file or partner utterance is looped;
* it is scaled so that ``10 log10(P_clean / P_interference) = snr`` with both powers measured over
  that segment (a silent segment or silent interference is not mixed: scale 0).

All draws come from one ``torch.Generator`` on the batch's device in a fixed order, six uniforms
per utterance, so the result is reproducible and no host synchronisation happens. The input is
never modified: the clean batch stays available for the quantizer targets.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NestAugment", "KIND_NONE", "KIND_NOISE", "KIND_SPEECH"]

KIND_NONE, KIND_NOISE, KIND_SPEECH = 0, 1, 2


class NestAugment(nn.Module):
    """Batch mixing augmentation (see the module docstring for the exact rule).

    ``forward(audio (B, N) float, lengths (B,) int64, noise (B, M) float | None = None,
    noise_lengths (B,) int64 | None = None, generator=None, return_info=False)``
    returns ``noisy (B, N)`` (same dtype and device as audio), or ``(noisy, info)`` with ``info``
    a dict of (B,) tensors: ``kind`` int64 (KIND_NONE/NOISE/SPEECH), ``seg_start``, ``seg_len``
    int64, ``snr_db`` float32 (the drawn SNR, meaningful where kind != NONE), ``partner`` int64
    (the speech source, -1 otherwise), ``scale`` (the gain applied to the interference).
    """

    def __init__(self, prob: float = 0.5, noise_prob: float = 0.5,
                 noise_snr: tuple[float, float] = (-5.0, 20.0),
                 speech_snr: tuple[float, float] = (-5.0, 5.0), segment_ratio: float = 0.5):
        super().__init__()
        for name, p in (("prob", prob), ("noise_prob", noise_prob)):
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        for name, r in (("noise_snr", noise_snr), ("speech_snr", speech_snr)):
            if len(r) != 2 or not (r[0] <= r[1]):
                raise ValueError(f"{name} must be (low, high) with low <= high, got {r}")
        if not (0.0 < segment_ratio <= 1.0):
            raise ValueError(f"segment_ratio must be in (0, 1], got {segment_ratio}")
        self.prob, self.noise_prob = float(prob), float(noise_prob)
        self.noise_snr = (float(noise_snr[0]), float(noise_snr[1]))
        self.speech_snr = (float(speech_snr[0]), float(speech_snr[1]))
        self.segment_ratio = float(segment_ratio)

    def extra_repr(self) -> str:
        return (f"prob={self.prob}, noise_prob={self.noise_prob}, noise_snr={self.noise_snr}, "
                f"speech_snr={self.speech_snr}, segment_ratio={self.segment_ratio}")

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, noise: torch.Tensor | None = None,
                noise_lengths: torch.Tensor | None = None, generator: torch.Generator | None = None,
                return_info: bool = False):
        _check_inputs(audio, lengths, noise, noise_lengths, generator)
        B, N = audio.shape
        dev = audio.device
        if B == 0 or N == 0:
            z = torch.zeros(B, dtype=torch.int64, device=dev)
            info = {"kind": z, "seg_start": z, "seg_len": z, "partner": z - 1,
                    "snr_db": torch.zeros(B, device=dev), "scale": torch.zeros(B, device=dev, dtype=audio.dtype)}
            return (audio.clone(), info) if return_info else audio.clone()
        # Power sums in at least float32 (bf16/fp16 audio would lose the SNR).
        cdt = torch.float64 if audio.dtype == torch.float64 else torch.float32
        x = audio.to(cdt)
        L = lengths.clamp(0, N)
        if noise is not None and noise.shape[1] < N:  # rare: pad so every gather stays in range
            noise = torch.nn.functional.pad(noise, (0, N - noise.shape[1]))
        # Only the first N noise samples are used (the loader crops noise to the utterance).
        nl = torch.zeros_like(L) if noise is None else noise_lengths.clamp(0, N)
        d = self._draw(L, nl, noise is not None, generator)
        noisy, scale = self._mix(x, None if noise is None else noise.to(cdt), d, in_place=x is not audio)
        noisy = noisy.to(audio.dtype)
        if not return_info:
            return noisy
        kind, mixed = d["kind"], d["kind"] != KIND_NONE
        info = {"kind": kind, "seg_start": torch.where(mixed, d["seg_start"], 0),
                "seg_len": torch.where(mixed, d["seg_len"], 0), "snr_db": d["snr_db"].float(),
                "partner": torch.where(kind == KIND_SPEECH, d["partner"], -1), "scale": scale}
        return noisy, info

    def _draw(self, L: torch.Tensor, nl: torch.Tensor, have_noise: bool,
              generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The random decisions per utterance, from six uniforms each in a fixed order: kind,
        partner, segment, SNR and where the source is read from. All (B,) tensors."""
        B, dev = L.shape[0], L.device
        u = torch.rand(6, B, generator=generator, device=dev, dtype=torch.float64)
        u_mix, u_kind, u_snr, u_seg, u_partner, u_src = u
        mixed = (u_mix < self.prob) & (L > 0)
        if have_noise:
            want_noise = (u_kind < self.noise_prob) & (nl > 0)
        else:
            want_noise = torch.zeros(B, dtype=torch.bool, device=dev)
        if B > 1:
            # Uniform over the other B-1 rows: b + 1 + floor(u * (B-1)) mod B.
            partner = (torch.arange(B, device=dev) + 1
                       + (u_partner * (B - 1)).long().clamp(max=B - 2)) % B
            partner_ok = L[partner] > 0
        else:
            partner = torch.zeros(B, dtype=torch.int64, device=dev)
            partner_ok = torch.zeros(B, dtype=torch.bool, device=dev)
        kind = torch.where(mixed & want_noise, KIND_NOISE,
                           torch.where(mixed & ~want_noise & partner_ok, KIND_SPEECH, KIND_NONE))
        is_noise = kind == KIND_NOISE

        seg_len = torch.floor(self.segment_ratio * L.to(torch.float64)).long().clamp(min=1)
        seg_len = torch.minimum(seg_len, L)
        seg_start = (u_seg * (L - seg_len + 1).to(torch.float64)).long()
        seg_start = torch.minimum(seg_start, L - seg_len).clamp(min=0)
        # SNR bounds selected in float64 arithmetic (a where() over Python floats is float32).
        w = is_noise.to(torch.float64)
        lo = self.speech_snr[0] + w * (self.noise_snr[0] - self.speech_snr[0])
        hi = self.speech_snr[1] + w * (self.noise_snr[1] - self.speech_snr[1])
        src_len = torch.where(is_noise, nl, L[partner]).clamp(min=1)
        src_start = torch.minimum((u_src * src_len.to(torch.float64)).long(), src_len - 1)
        return {"kind": kind, "partner": partner, "seg_start": seg_start, "seg_len": seg_len,
                "snr_db": lo + u_snr * (hi - lo), "src_len": src_len, "src_start": src_start}

    def _mix(self, x: torch.Tensor, noise: torch.Tensor | None, d: dict[str, torch.Tensor],
             in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N) with each drawn segment's interference added at its SNR (into x itself when
        ``in_place``: a converted copy of the caller's audio), and the (B,) gains."""
        B, N = x.shape
        dev = x.device
        kind, partner, seg_len = d["kind"], d["partner"], d["seg_len"]
        is_noise, active = kind == KIND_NOISE, kind != KIND_NONE
        # Work on (B, S) windows over the segments only. S bounds every seg_len from the shape
        # alone (seg_len <= floor(ratio * N)), so sizing them needs no host synchronisation.
        # Source positions stay below src_len <= N <= M, so the flat gathers need no clamping.
        S = max(1, int(math.floor(self.segment_ratio * N)))
        k = torch.arange(S, device=dev)
        valid = k[None, :] < torch.where(active, seg_len, 0)[:, None]          # (B, S)
        dst = (d["seg_start"][:, None] + k[None, :]).clamp_(max=N - 1)      # where each sample goes
        src_pos = torch.remainder(d["src_start"][:, None] + k[None, :], d["src_len"][:, None])
        # torch.take on flat indices: one kernel, no (B, S) broadcasting inside the gather.
        rows = torch.arange(B, device=dev)
        interf = torch.take(x, src_pos + (partner * N)[:, None])
        if noise is not None:
            from_noise = torch.take(noise, src_pos + (rows * noise.shape[1])[:, None])
            interf = torch.where(is_noise[:, None], from_noise, interf)
        interf = torch.where(valid, interf, 0.0)
        clean = torch.where(valid, torch.take(x, dst + (rows * N)[:, None]), 0.0)

        p_clean = clean.square().sum(1)
        p_interf = interf.square().sum(1)  # same segment length: the 1/len cancels in the ratio
        ratio = p_clean / (p_interf * torch.pow(10.0, d["snr_db"] / 10.0).to(x.dtype))
        ok = (p_clean > 0) & (p_interf > 0) & active
        scale = torch.where(ok, torch.sqrt(torch.where(ok, ratio, torch.ones_like(ratio))),
                            torch.zeros_like(ratio))
        # Positions past a segment's end add exact zeros, so repeated (clamped) targets are harmless
        # and the result does not depend on the order of the additions.
        noisy = x if in_place else x.clone()
        noisy.scatter_add_(1, dst, scale[:, None] * interf)
        return noisy, scale


def _check_inputs(audio, lengths, noise, noise_lengths, generator) -> None:
    """Shapes, dtypes and devices of NestAugment's arguments, each error naming the argument."""
    if audio.dim() != 2 or not audio.is_floating_point():
        raise ValueError(f"audio: expected a (B, N) floating tensor, got {tuple(audio.shape)} {audio.dtype}")
    B, _ = audio.shape
    dev = audio.device
    if lengths.shape != (B,) or lengths.dtype != torch.int64 or lengths.device != dev:
        raise ValueError(f"lengths: expected ({B},) int64 on {dev}, got {tuple(lengths.shape)} "
                         f"{lengths.dtype} on {lengths.device}")
    if (noise is None) != (noise_lengths is None):
        raise ValueError("noise and noise_lengths must be given together")
    if noise is not None:
        if noise.dim() != 2 or noise.shape[0] != B or noise.device != dev or not noise.is_floating_point():
            raise ValueError(f"noise: expected a ({B}, M) floating tensor on {dev}, got "
                             f"{tuple(noise.shape)} {noise.dtype} on {noise.device}")
        if noise_lengths.shape != (B,) or noise_lengths.dtype != torch.int64 or noise_lengths.device != dev:
            raise ValueError(f"noise_lengths: expected ({B},) int64 on {dev}, got "
                             f"{tuple(noise_lengths.shape)} {noise_lengths.dtype} on {noise_lengths.device}")
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(f"generator: is on {generator.device}, the batch on {dev}")
