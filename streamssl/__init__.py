"""streamssl: self-supervised pretraining of streaming speech encoders (NEST / BEST-RQ style)."""

__version__ = "0.1.0"


def load_encoder(path, map_location="cpu", with_features=False):
    """Rebuild a pretrained encoder; see ``streamssl.export.load_encoder``."""
    from streamssl.export import load_encoder as _load

    return _load(path, map_location=map_location, with_features=with_features)
