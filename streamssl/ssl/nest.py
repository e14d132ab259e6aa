"""The NEST / BEST-RQ pretraining model: clean audio -> targets; noisy, masked audio -> predictions.

Frame alignment (stated once, used everywhere): the causal 8x subsampling makes encoder frame j
cover feature frames [8j, 8j + 8) (plus left context, never a later frame), and token j of the
quantizer is the stack of exactly those clean frames. Encoder frame j is scored iff at least
``target_threshold`` of its 8 input frames are masked, so its own frames are hidden from it and it
must infer them from the unmasked past (and the right context the attention allows).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from streamssl.data.augment import NestAugment
from streamssl.nn.encoder import FastConformerEncoder
from streamssl.ssl.decoder import MaskedPredictionHead
from streamssl.ssl.features import LogMelFeatures
from streamssl.ssl.loss import masked_prediction_loss
from streamssl.ssl.masking import BlockMasking
from streamssl.ssl.quantizer import RandomProjectionQuantizer


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(cfg, Mapping):
        raise ValueError(f"model config must be a mapping, got {type(cfg).__name__}")
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


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
        cfg = _plain(cfg)
        enc, feat, msk, qz, aug = (cfg[k] for k in ("encoder", "features", "masking", "quantizer", "augment"))
        factor = enc["subsampling_factor"]
        feat_args = {k: v for k, v in feat.items() if k != "normalize"}
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
        self.head = MaskedPredictionHead(enc["d_model"], qz["num_codes"], qz["num_codebooks"])

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
            clean, feat_lengths = self.target_features(audio, audio_lengths)
            tokens, _ = self.quantizer(clean, feat_lengths)  # (B, T // 8, G)
            noisy = audio
            if self.training and self.augment.prob > 0:
                noisy = self.augment(audio, audio_lengths, noise, noise_lengths, generator=generator)
            feats, _ = self.features(noisy, audio_lengths, generator=generator)
        masked, mask = self.masking(feats, feat_lengths)
        encoded, _ = self.encoder(masked, feat_lengths)
        # Targets only where a whole 8-frame group lies inside the utterance (j < length // 8).
        positions = self.masking.target_mask(mask, feat_lengths, num_frames=tokens.shape[1])
        if encoded.shape[1] > tokens.shape[1]:  # T not a multiple of 8: the last partial group
            encoded = encoded[:, : tokens.shape[1]]
        logits = self.head(encoded, positions)
        targets = tokens[positions]
        loss, acc = masked_prediction_loss(logits, targets)
        return {
            "loss": loss,
            "acc": acc,
            "num_targets": positions.sum(),
            "targets": targets,
            "predictions": logits.detach().argmax(-1),
        }
