"""bitsandbytes-quantized weights (Linear4bit, Linear8bitLt) seen as the plain weights they compute with.

A 4-bit weight holds packed codes ([n, 1] uint8) and its QuantState; an 8-bit one int8 codes and
row scales (SCB). Checks and DoRA's norm need the plain [out, in] weight: its shape and dtype are
the QuantState's, its values bitsandbytes' own dequantization (imported only for such a weight).
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["plain_dtype", "plain_shape", "plain_weight"]


def _kind(weight: object) -> str | None:
    """'4bit', '8bit' or None (a plain tensor)."""
    name = type(weight).__name__
    if name == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        return "4bit"
    if name == "Int8Params" and getattr(weight, "SCB", None) is not None:
        return "8bit"
    return None


def plain_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight the module computes with."""
    return tuple(weight.quant_state.shape) if _kind(weight) == "4bit" else tuple(weight.shape)


def plain_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the module computes in: a quantized weight's dequantized dtype (8-bit: float32)."""
    kind = _kind(weight)
    return weight.quant_state.dtype if kind == "4bit" else torch.float32 if kind else weight.dtype


def plain_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values as the module computes with them (dequantized by bitsandbytes)."""
    kind = _kind(weight)
    if kind is None:
        return weight
    functional = importlib.import_module("bitsandbytes.functional")
    if kind == "4bit":
        return functional.dequantize_4bit(weight.data, weight.quant_state)
    return functional.int8_vectorwise_dequant(weight.data, weight.SCB)
