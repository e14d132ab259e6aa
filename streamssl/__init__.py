"""streamssl: self-supervised pretraining of streaming speech encoders (NEST / BEST-RQ style)."""

__version__ = "0.1.0"
