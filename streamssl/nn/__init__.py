"""Neural-network modules of streamssl: the causal FastConformer encoder and its parts."""

from .attention import RelPositionMultiHeadAttention, context_mask, rel_position_sinusoid
from .conformer import ConformerBlock, FeedForward
from .conv_module import CausalConvModule, PlainConvModule
from .encoder import EncoderStreamState, FastConformerEncoder, LayerStreamState
from .presets import PRESETS, build_encoder, encoder_config
from .subsampling import CausalStridingSubsampling

__all__ = [
    "CausalConvModule",
    "CausalStridingSubsampling",
    "ConformerBlock",
    "EncoderStreamState",
    "FastConformerEncoder",
    "FeedForward",
    "LayerStreamState",
    "PRESETS",
    "PlainConvModule",
    "RelPositionMultiHeadAttention",
    "build_encoder",
    "context_mask",
    "encoder_config",
    "rel_position_sinusoid",
]
