"""Rope parameters and scaling as llama.cpp's converter writes them: plain, linear, llama3.

llama3's scaling is a tensor of its own (`rope_freqs.weight`, one factor per frequency), computed
from the config as the converter's LlamaModel.generate_extra_tensors computes it.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from adaptrix.ir.errors import UnsupportedError

__all__ = ["add_rope_scaling", "check_rope", "rope_params", "rope_tensors", "swa_rope_theta"]

_SUPPORTED = ("linear", "llama3")


def _get(config: dict, *keys: str):
    return next((config[key] for key in keys if config.get(key) is not None), None)


def rope_params(config: dict) -> dict:
    """The rope parameters as transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) saves them."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))  # transformers 5, per layer type: the global layers'
    params.setdefault("rope_theta", _get(config, "rope_theta", "rotary_emb_base"))
    return params


def swa_rope_theta(config: dict) -> float | None:
    """The sliding-window layers' own rope base, where transformers 5 saves one per layer type."""
    return ((config.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")


def _kind(config: dict) -> str | None:
    params = rope_params(config)
    kind = params.get("rope_type", params.get("type"))
    return None if kind == "default" else kind


def check_rope(config: dict, path: Path, llama3: bool = False) -> None:
    """Plain rope, linear scaling, and llama3's where the family is llama; the others are refused."""
    kind = _kind(config)
    if kind is None or kind == "linear" or (kind == "llama3" and llama3):
        return
    raise UnsupportedError(f"rope scaling {kind!r}: the gguf target writes plain, linear and (llama-like "
                           "graphs that read rope_freqs) llama3 rope", path=path / "config.json",
                           fix="use --target merged, then llama.cpp's converter")  # fmt: skip


def add_rope_scaling(w: gguf.GGUFWriter, config: dict) -> None:
    """Linear rope scaling's keys, as the converter writes them (llama3's is a tensor: rope_tensors)."""
    if _kind(config) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_params(config)["factor"])


def rope_tensors(config: dict) -> list[tuple[str, np.ndarray]]:
    """llama3 rope scaling's `rope_freqs.weight` (the converter's generate_extra_tensors); else none."""
    if _kind(config) != "llama3":
        return []
    params = rope_params(config)
    base = params.get("rope_theta") or 10000.0
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [(name, np.array(factors, dtype=np.float32))]
