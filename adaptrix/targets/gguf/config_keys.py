"""A model config read as llama.cpp's converter reads it: the first key set, the attention head width."""

from __future__ import annotations

__all__ = ["get", "head_dim"]


def get(config: dict, *keys: str, default=None):
    """The first of `keys` the config sets (the converter's find_hparam)."""
    return next((config[key] for key in keys if config.get(key) is not None), default)


def head_dim(config: dict) -> int:
    """The attention head width: `head_dim` where set, else hidden_size / num_attention_heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
