"""Config-like objects (OmegaConf nodes or mappings) as plain nested dicts."""

from __future__ import annotations

from collections.abc import Mapping


def plain(config, what: str = "config") -> dict:
    """``config`` as a plain dict (interpolations resolved, lists as lists); None is ``{}``.

    Raises ValueError naming ``what`` when ``config`` is not a mapping.
    """
    if config is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(config, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(config).__name__}")
    return {k: (plain(v, what) if isinstance(v, Mapping) else v) for k, v in config.items()}
