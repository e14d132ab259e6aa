"""Named encoder sizes for configs: ``model.encoder: {preset: small, att_context_size: [-1, 0], ...}``.

* ``demo``: tiny (about 1.0 M parameters) so the demo recipe pretrains on a 2-core CPU in minutes.
* ``small``: FastConformer-S sizes (d 176, 16 layers, 4 heads; about 12.6 M parameters).
* ``large``: FastConformer-L sizes (d 512, 17 layers, 8 heads; about 109 M parameters).

All use an 8x causal subsampling and conv kernel 9. Keys given next to ``preset`` override it.
"""

from __future__ import annotations


from streamssl._mapping import plain

from .encoder import FastConformerEncoder

PRESETS: dict[str, dict] = {
    "demo": dict(
        feat_in=80, d_model=96, n_layers=4, n_heads=4, ff_expansion=4, conv_kernel_size=9,
        subsampling_factor=8, subsampling_channels=64, dropout=0.1,
    ),
    "small": dict(
        feat_in=80, d_model=176, n_layers=16, n_heads=4, ff_expansion=4, conv_kernel_size=9,
        subsampling_factor=8, subsampling_channels=256, dropout=0.1,
    ),
    "large": dict(
        feat_in=80, d_model=512, n_layers=17, n_heads=8, ff_expansion=4, conv_kernel_size=9,
        subsampling_factor=8, subsampling_channels=256, dropout=0.1,
    ),
}

_ENCODER_KEYS = frozenset(
    (
        "feat_in d_model n_layers n_heads ff_expansion conv_kernel_size subsampling_factor "
        "subsampling_channels att_context_size att_context_style dropout att_context_seed conv_impl"
    ).split()
)


def encoder_config(config=None, **overrides) -> dict:
    """The constructor keyword arguments for ``config`` (a mapping, optionally with ``preset``).

    Later sources win: the preset, then the other keys of ``config``, then ``overrides``.
    Unknown keys raise ValueError naming them.
    """
    cfg = {**plain(config, "encoder config"), **overrides}
    preset = cfg.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    unknown = sorted(set(cfg) - _ENCODER_KEYS)
    if unknown:
        raise ValueError(f"unknown encoder config keys {unknown}; known: {sorted(_ENCODER_KEYS | {'preset'})}")
    return {**(PRESETS[preset] if preset else {}), **cfg}


def build_encoder(config=None, **overrides) -> FastConformerEncoder:
    """``FastConformerEncoder(**encoder_config(config, **overrides))``; e.g. ``build_encoder({"preset": "demo"})``."""
    return FastConformerEncoder(**encoder_config(config, **overrides))
