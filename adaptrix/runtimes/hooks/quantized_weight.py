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
    if name == "Int8Params" and weight.dtype == torch.int8:
        return "8bit"
    return None


def plain_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight the module computes with."""
    return tuple(weight.quant_state.shape) if _kind(weight) == "4bit" else tuple(weight.shape)


def plain_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the module computes in: a quantized weight's dequantized dtype (8-bit: float32)."""
    kind = _kind(weight)
    return weight.quant_state.dtype if kind == "4bit" else torch.float32 if kind else weight.dtype


def plain_weight(weight: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The values `module` computes with from its `weight` (dequantized by bitsandbytes).

    An 8-bit module's row scales move from its weight to its matmul state on its first forward.
    """
    kind = _kind(weight)
    if kind is None:
        return weight
    functional = importlib.import_module("bitsandbytes.functional")
    state = getattr(weight, "quant_state", None)
    if kind == "4bit" and getattr(state, "packing_format_for_cpu", False):
        # repacked by a CPU eval forward for bitsandbytes' AVX512-BF16 kernel: read back through it
        eye = torch.eye(state.shape[1], dtype=state.dtype, device=weight.device)
        return functional.gemv_4bit(eye, weight.data, state=state).T
    if kind == "4bit":
        return functional.dequantize_4bit(weight.data, state)
    scales = getattr(weight, "SCB", None)
    scales = scales if scales is not None else getattr(getattr(module, "state", None), "SCB", None)
    return functional.int8_vectorwise_dequant(weight.data, scales)
