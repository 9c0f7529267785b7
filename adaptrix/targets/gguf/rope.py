"""Rope parameters and scaling as llama.cpp's converter writes them: plain, linear, llama3, YaRN, longrope.

llama3's scaling is a tensor of its own (`rope_freqs.weight`, one factor per frequency), computed
from the config as the converter's LlamaModel.generate_extra_tensors computes it; Phi-3's longrope
is two (`rope_factors_long` / `_short`) and an attention factor, as Phi3MiniModel writes them.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.gguf.config_keys import get, head_dim

__all__ = ["add_rope_scaling", "check_rope", "rope_dims", "rope_params", "rope_tensors", "swa_rope_theta"]

# YaRN as transformers computes it and llama.cpp too: its mscale from the factor (no attention_factor
# given: llama.cpp multiplies a given one by that mscale again), rounded correction dims (truncate),
# no DeepSeek-style mscale / mscale_all_dim.
_YARN_DEFAULTS = {"attention_factor": None, "attn_factor": None, "truncate": True, "mscale": None,
                  "mscale_all_dim": None}  # fmt: skip


def rope_params(config: dict) -> dict:
    """The rope parameters as transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) saves them."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))  # transformers 5, per layer type: the global layers'
    params.setdefault("rope_theta", get(config, "rope_theta", "rotary_emb_base"))
    return params


def swa_rope_theta(config: dict) -> float | None:
    """The sliding-window layers' own rope base, where transformers 5 saves one per layer type."""
    return ((config.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")


def _kind(config: dict) -> str | None:
    params = rope_params(config)
    kind = params.get("rope_type", params.get("type"))
    return None if kind == "default" else kind


def check_rope(config: dict, path: Path, llama3: bool = False, longrope: bool = False) -> None:
    """Plain rope, linear and YaRN scaling, llama3's (llama) and longrope (phi3); the others are refused."""
    kind = _kind(config)
    if kind in ("longrope", "su") and longrope:
        _check_longrope(config, path)
        return
    if kind == "yarn":
        params = rope_params(config)
        odd = {
            key: params[key] for key, default in _YARN_DEFAULTS.items() if params.get(key, default) != default
        }
        if odd:
            raise UnsupportedError(f"YaRN rope with {odd}: llama.cpp's YaRN computes its own attention scale "
                                   "and rounds its correction range", path=path / "config.json",
                                   fix="use --target merged or hooks")  # fmt: skip
        return
    if kind is None or kind == "linear" or (kind == "llama3" and llama3):
        return
    raise UnsupportedError(f"rope scaling {kind!r}: the gguf target writes plain, linear, YaRN, llama3 "
                           "(llama-like graphs that read rope_freqs) and (phi3) longrope rope",
                           path=path / "config.json",
                           fix="use --target merged, then llama.cpp's converter")  # fmt: skip


def _check_longrope(config: dict, path: Path) -> None:
    """Factors for each rotary frequency, and no attention factor of its own (llama.cpp derives it)."""
    params = rope_params(config)
    half = rope_dims(config) // 2
    long, short = params.get("long_factor"), params.get("short_factor")
    if not (isinstance(long, list) and isinstance(short, list) and len(long) == len(short) == half):
        raise UnsupportedError(f"longrope needs long_factor and short_factor of {half} values each",
                               path=path / "config.json", fix="fix the config's rope_scaling")  # fmt: skip
    if params.get("attention_factor") is not None:
        raise UnsupportedError("longrope with its own attention_factor: llama.cpp derives it from the "
                               "context lengths", path=path / "config.json",
                               fix="use --target merged or hooks")  # fmt: skip


def rope_dims(config: dict) -> int:
    """The rotated dimensions per head, as Phi3MiniModel counts them (partial_rotary_factor of the width)."""
    rotary = config.get("partial_rotary_factor") or rope_params(config).get("partial_rotary_factor") or 1.0
    return int(rotary * config["hidden_size"]) // config["num_attention_heads"]


def _longrope_attention(config: dict) -> float:
    """Phi3MiniModel's attention factor: sqrt(1 + ln(scale) / ln(original context)), 1 unscaled."""
    original = (
        rope_params(config).get("original_max_position_embeddings")
        or config["original_max_position_embeddings"]
    )
    scale = config["max_position_embeddings"] / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def add_rope_scaling(w: gguf.GGUFWriter, config: dict) -> None:
    """Linear and YaRN rope scaling's keys, as the converter writes them (llama3's: rope_tensors)."""
    kind, params = _kind(config), rope_params(config)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(params["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(params["factor"])
        original = params.get("original_max_position_embeddings") or config.get(
            "original_max_position_embeddings"
        )
        w.add_rope_scaling_orig_ctx_len(original or config["max_position_embeddings"])
        if (ext := params.get("extrapolation_factor")) is not None:
            w.add_rope_scaling_yarn_ext_factor(ext)
        if (fast := params.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(fast)
        if (slow := params.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(slow)
    elif kind in ("longrope", "su"):
        w.add_rope_scaling_attn_factors(_longrope_attention(config))


def rope_tensors(config: dict) -> list[tuple[str, np.ndarray]]:
    """llama3's `rope_freqs.weight`, longrope's long and short factors (generate_extra_tensors); else none."""
    if _kind(config) in ("longrope", "su"):
        params = rope_params(config)
        return [(gguf.TENSOR_NAMES[kind] + ".weight", np.array(params[key], dtype=np.float32))
                for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                                  (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))]  # fmt: skip
    if _kind(config) != "llama3":
        return []
    params = rope_params(config)
    base = params.get("rope_theta") or 10000.0
    dim = head_dim(config)
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
