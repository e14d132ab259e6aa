"""Self-supervised pretraining model: clean audio -> random-projection targets; noisy audio -> predictions.

Two objectives (``model.objective.kind``) share features, quantizer, augmentation and encoder:

* ``masked`` (NEST / BEST-RQ): blocks of input frames are masked; encoder frame j is scored against
  its own token j iff at least ``target_threshold`` of its 8 input frames are masked, so it must
  infer them from the unmasked past (and the right context the attention allows).
* ``next_token`` (NEST-RQ): nothing is masked; every encoder frame j predicts the tokens
  j + k for k in ``offsets`` (the future it has not seen), one classifier per offset. This is
  defined for a causal encoder, where masked-block prediction is mostly unpredictable.

Frame alignment (stated once, used everywhere): the causal 8x subsampling makes encoder frame j
cover feature frames [8j, 8j + 8) (plus left context, never a later frame), and token j of the
quantizer is the stack of exactly those clean frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from streamssl._mapping import plain
from streamssl.data.augment import NestAugment
from streamssl.nn.encoder import FastConformerEncoder
from streamssl.ssl.decoder import MaskedPredictionHead
from streamssl.ssl.features import LogMelFeatures
from streamssl.ssl.loss import masked_prediction_loss
from streamssl.ssl.masking import BlockMasking
from streamssl.ssl.quantizer import RandomProjectionQuantizer

OBJECTIVES = ("masked", "next_token")


class NEST(nn.Module):
    """Masked-token prediction over a streaming FastConformer.

    Args:
        cfg: the ``model`` section of a pretraining config (see streamssl.config.ModelConfig):
            ``encoder``, ``features``, ``masking``, ``quantizer``, ``augment``.
        seed: seeds the frozen quantizer, the mask embedding, the masking RNG key and the
            encoder's multi-latency draws.
        conv_impl: "op" (fused kernels) or "reference" (pure PyTorch), for comparisons.
    """

    def __init__(self, cfg, seed: int = 0, conv_impl: str = "op"):
        super().__init__()
        cfg = plain(cfg, "model config")
        enc, feat, msk, qz, aug = (cfg[k] for k in ("encoder", "features", "masking", "quantizer", "augment"))
        obj = cfg.get("objective") or {"kind": "masked"}
        if obj["kind"] not in OBJECTIVES:
            raise ValueError(f"objective.kind must be one of {OBJECTIVES}, got {obj['kind']!r}")
        self.objective = obj["kind"]
        self.offsets = [0] if self.objective == "masked" else [int(k) for k in obj["offsets"]]
        if self.objective == "next_token" and (not self.offsets or min(self.offsets) < 1):
            raise ValueError(f"objective.offsets must be a non-empty list of ints >= 1, got {obj['offsets']}")
        factor = enc["subsampling_factor"]
        feat_args = {k: v for k, v in feat.items() if k not in ("normalize", "stats")}
        # Encoder input: streaming-safe normalisation only. Targets: per utterance (training-only,
        # so looking at the whole utterance is allowed) and never dithered.
        self.features = LogMelFeatures(**feat_args, normalize=feat["normalize"], seed=seed)
        self.target_features = LogMelFeatures(**{**feat_args, "dither": 0.0}, normalize="per_utterance")
        self.quantizer = RandomProjectionQuantizer(
            feat_in=feat["n_mels"], stack=factor, code_dim=qz["code_dim"], num_codes=qz["num_codes"],
            num_codebooks=qz["num_codebooks"], seed=seed,
        )
        self.augment = NestAugment(prob=aug["prob"], noise_prob=aug["noise_ratio"], noise_snr=tuple(aug["noise_snr"]),
                                   speech_snr=tuple(aug["speech_snr"]), segment_ratio=aug["segment_ratio"])
        self.masking = BlockMasking(
            feat["n_mels"], mask_prob=msk["mask_prob"], block_size=msk["block_size"], min_start=msk["min_start"],
            left_context=msk["left_context"], max_mask_ratio=msk["max_mask_ratio"], align=msk["align"],
            seed=seed, learnable=msk.get("learnable_embedding", False), target_factor=factor,
            target_threshold=msk["target_threshold"],
        )
        self.encoder = FastConformerEncoder(**enc, att_context_seed=seed, conv_impl=conv_impl)
        self.num_codebooks = qz["num_codebooks"]
        self.head = MaskedPredictionHead(enc["d_model"], qz["num_codes"], qz["num_codebooks"] * len(self.offsets))
        # The targets' unigram log-distribution estimated on training data (set_head_prior): an
        # input-blind predictor whose validation loss is the honest baseline to beat.
        self.register_buffer("target_log_prior", torch.full((qz["num_codebooks"], qz["num_codes"]),
                                                            -float(torch.tensor(qz["num_codes"]).log())))

    def forward(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        noise: torch.Tensor | None = None,
        noise_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """One pretraining forward pass.

        Args:
            audio: (B, N) float32 clean audio at the feature sample rate; audio_lengths (B,) int64.
            noise, noise_lengths: optional (B, M) noise crops for the augmentation.
            generator: drives augmentation and dither (the trainer seeds one per step).
        Returns:
            dict with ``loss`` (scalar, differentiable), ``acc``, ``num_targets`` (int64 scalar
            tensor), ``targets`` (N, G) and ``predictions`` (N, G) int64 at the scored frames, and
            ``audio_seconds``-independent tensors only (no host synchronisation beyond the one
            boolean selection of scored frames).
        """
        with torch.no_grad():
            tokens, token_lengths, feats, feat_lengths = self._targets_and_inputs(
                audio, audio_lengths, noise, noise_lengths, generator)
        if self.objective == "masked":
            feats, mask = self.masking(feats, feat_lengths)
            # Targets only where a whole 8-frame group lies inside the utterance (j < length // 8).
            positions = self.masking.target_mask(mask, feat_lengths, num_frames=tokens.shape[1])
        else:
            j = torch.arange(tokens.shape[1], device=tokens.device)
            positions = j.unsqueeze(0) < (token_lengths - max(self.offsets)).unsqueeze(1)
        encoded, _ = self.encoder(feats, feat_lengths)
        if encoded.shape[1] > tokens.shape[1]:  # T not a multiple of 8: the last partial group
            encoded = encoded[:, : tokens.shape[1]]
        logits = self.head(encoded, positions)  # (N, K, C)
        targets = self._gather_targets(tokens, positions)  # (N, K)
        loss, acc = masked_prediction_loss(logits, targets)
        return {
            "loss": loss,
            "acc": acc,
            "num_targets": positions.sum(),
            "targets": targets,
            "predictions": logits.detach().argmax(-1),
            "encoded": encoded.detach(),
            "encoded_lengths": token_lengths,
        }

    def _targets_and_inputs(self, audio, audio_lengths, noise, noise_lengths, generator):
        """Clean tokens (B, T // 8, G) and their lengths; the encoder's (augmented) input features."""
        clean, feat_lengths = self.target_features(audio, audio_lengths)
        tokens, token_lengths = self.quantizer(clean, feat_lengths)
        noisy = audio
        if self.training and self.augment.prob > 0:
            noisy = self.augment(audio, audio_lengths, noise, noise_lengths, generator=generator)
        feats, _ = self.features(noisy, audio_lengths, generator=generator)
        return tokens, token_lengths, feats, feat_lengths

    def _gather_targets(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N, K) targets at the scored frames: column (k, g) is codebook g of token j + offsets[k]."""
        cols = [tokens[:, k:][positions[:, : tokens.shape[1] - k]] for k in self.offsets]  # each (N, G)
        return torch.cat(cols, dim=1)

    @torch.no_grad()
    def target_counts(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> torch.Tensor:
        """(G, C) float64 counts of the clean targets of a batch (for ``head.set_prior``)."""
        clean, feat_lengths = self.target_features(audio, audio_lengths)
        tokens, token_lengths = self.quantizer(clean, feat_lengths)
        valid = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < token_lengths.unsqueeze(1)
        t = tokens[valid]  # (N, G)
        C = self.quantizer.num_codes
        return torch.stack([torch.bincount(t[:, g], minlength=C) for g in range(t.shape[1])]).double().cpu()

    def set_head_prior(self, counts: torch.Tensor, smoothing: float = 0.1) -> None:
        """Start the head at the targets' unigram distribution: (G, C) counts, repeated per offset.

        Also keeps the (smoothed) distribution in ``target_log_prior`` for the validation baseline.
        """
        counts = counts.double()
        p = (counts + smoothing) / (counts.sum(-1, keepdim=True) + smoothing * counts.shape[-1])
        self.target_log_prior.copy_(p.log().to(self.target_log_prior))
        self.head.set_prior(counts.repeat(len(self.offsets), 1), smoothing=smoothing)
