"""bitsandbytes' CPU dequantization kernels, called through its own native library, not torch.ops.

bitsandbytes registers its kernels as torch custom ops, and the first call of any of them imports
torch._dynamo: about 1 s of CPU, on a merge's path, longer than dequantizing every weight of a 1B
model. On CPU those ops are thin wrappers around C functions of bitsandbytes' native library
(bitsandbytes/backends/cpu/ops.py). For the two a merge calls, 4-bit dequantization and the
blockwise dequantization of double-quantized scales, this calls the same C functions with the
same arguments, keeping the ops' own fallbacks: any case they route elsewhere (blocks of 2048 and
more on AVX-512, odd rows, other shapes, a dtype without a kernel, a library that did not load)
goes through bitsandbytes' public functions instead. The values are the ops' own (tests/test_qlora.py checks
them equal, and that torch._dynamo stays unimported).
"""

from __future__ import annotations

import ctypes
import functools

import torch

__all__ = ["dequantize_4bit"]

_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dequantize_4bit(functional, packed: torch.Tensor, state) -> torch.Tensor:
    """`functional.dequantize_4bit(packed, state)` on CPU, without bitsandbytes' torch.ops layer."""
    native = _native()
    shape, dtype, kind = tuple(state.shape), state.dtype, state.quant_type
    name = f"cdequantize_blockwise_cpu_{kind}_{_SUFFIX.get(dtype, '')}"
    routed_elsewhere = native is None or not hasattr(native, name) or packed.device.type != "cpu"
    unusual = len(shape) != 2 or shape[-1] % 2 or packed.dim() == 0 or packed.shape[0] == 1  # reshaped there
    if routed_elsewhere or unusual or (_avx512() and state.blocksize >= 2048):
        return functional.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:  # as functional.dequantize_4bit does, through the blockwise kernel
        absmax = _blockwise(functional, native, state.absmax, state.state2)
        absmax += state.offset
    absmax = absmax.float().contiguous()
    rows, width = shape
    codes = packed.view(torch.uint8).reshape(rows, width // 2).contiguous()
    out = torch.empty(shape, dtype=dtype)
    getattr(native, name)(_ptr(codes), _ptr(absmax), _ptr(out), ctypes.c_longlong(state.blocksize),
                          ctypes.c_longlong(rows), ctypes.c_longlong(width))  # fmt: skip
    return out


def _blockwise(functional, native, codes: torch.Tensor, state) -> torch.Tensor:
    """`functional.dequantize_blockwise(codes, state)` (8-bit blocks: a 4-bit weight's scales)."""
    name = f"cdequantize_blockwise_cpu_{_SUFFIX.get(state.dtype, '')}"
    if state.nested or codes.dtype != torch.uint8 or state.blocksize <= 0 or not hasattr(native, name):
        return functional.dequantize_blockwise(codes, state)
    codes = codes.contiguous()
    code = state.code.contiguous()
    absmax = state.absmax.contiguous()
    out = torch.empty_like(codes, dtype=state.dtype)
    getattr(native, name)(_ptr(code), _ptr(codes), _ptr(absmax), _ptr(out),
                          ctypes.c_longlong(state.blocksize), ctypes.c_longlong(codes.numel()))  # fmt: skip
    return out


def _ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


@functools.cache
def _native():
    """The loaded native library of bitsandbytes, or None (not loaded: its error stand-in)."""
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError:
        return None
    return None if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) else lib


@functools.cache
def _avx512() -> bool:
    """The test bitsandbytes makes for its AVX-512 kernels (which it bypasses for large blocks)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"
