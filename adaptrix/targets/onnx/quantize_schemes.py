"""The quantization schemes, and the quantized arrays of one weight in each.

Every scheme quantizes activations at run time (dynamic quantization); they differ in the weights:

- int8: MatMulNBits with 8 bits, symmetric blocks of `block_size` along the input (no zero
  points), computed with int8 activations quantized per block of each row (accuracy level 4): what
  onnxruntime-genai's model builder writes for its int8 precision. Logits 4x closer to float32
  than int8-dynamic's on the benchmark's trained decoder (relative error 1.4e-2 against 5.3e-2;
  greedy agreement 100% against 98.8%): per block, an outlier channel (the FFN's down projection
  reads the largest) costs precision only in its own block.
- int8-dynamic: DynamicQuantizeMatMul, onnxruntime's fused form of quantize_dynamic's int8 (int8
  weights, symmetric, one scale per tensor; activations quantized with one scale per call): the
  bytes quantize_dynamic writes, without its MatMulInteger detour. The fastest on AVX2 CPUs
  (decode MatMuls about 1.4x faster than int8's there), the least exact.
- int4: MatMulNBits with 4 bits, asymmetric blocks (a zero point per block: greedy agreement
  97.7% against 94.9% symmetric on the benchmark's trained decoder), accuracy level 4, as
  onnxruntime-genai's CPU models are.
- int4-sym: the same with symmetric blocks (no zero points, codes offset by 8), as the builder's
  `-p int4` writes them: its lighter kernel (decode about 7% faster than int4 on the 1.1B model
  here), int4's accuracy traded for it. `--calibration` is refused with it: GPTQ's symmetric
  4-bit blocks came out further from float32 than rounding to nearest on the test model.

The blocks come from onnxruntime's own kernels (quantize_matmul_8bits / _4bits), so they are
the bytes MatMulNBitsQuantizer writes; with `--calibration`, GPTQ rounds them instead (gptq.py),
in the same layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from adaptrix.ir.errors import BadInputError
from adaptrix.targets.onnx.external import read_initializer, value_array

__all__ = [
    "BLOCKED_SCHEMES",
    "DEFAULT_BLOCK_SIZE",
    "QUANTIZE_SCHEMES",
    "array_shapes",
    "check_quantize",
    "factor_cache",
    "gptq_arrays",
    "quantized_arrays",
]

QUANTIZE_SCHEMES = ("int8", "int4", "int4-sym", "int8-dynamic")
BLOCKED_SCHEMES = {"int8": 8, "int4": 4, "int4-sym": 4}  # MatMulNBits schemes: bits
_SYMMETRIC = {"int8", "int4-sym"}  # blocked schemes without zero points
DEFAULT_BLOCK_SIZE = 32
_INT8_MAX = 127


def check_quantize(scheme: str | None, block_size: int | None) -> None:
    """Refuse an unknown scheme, a block size without a blocked scheme, or one not a power of two >= 16."""
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise BadInputError(f"unknown --quantize {scheme!r}",
                            fix=f"choose one of: {', '.join(QUANTIZE_SCHEMES)}")  # fmt: skip
    if block_size is None:
        return
    if scheme not in BLOCKED_SCHEMES:
        raise BadInputError(f"--block-size {block_size} given for --quantize {scheme or '(none)'}",
                            fix="--block-size applies to --quantize int8 and int4; leave it out")  # fmt: skip
    if block_size < 16 or block_size & (block_size - 1):
        raise BadInputError(f"--block-size {block_size} is not a power of two >= 16", fix="use 32, 64 or 128")


def array_shapes(scheme: str, dims: tuple[int, ...], name: str, block_size: int) -> dict[str, tuple]:
    """{initializer: (shape, dtype)} of a [K, N] weight's quantized form, as quantized_arrays makes it."""
    k, n = dims
    blocks = -(-k // block_size)
    if BLOCKED_SCHEMES.get(scheme) == 4:
        shapes = {
            f"{name}_Q4": ((n, blocks, block_size // 2), np.uint8),
            f"{name}_scales": ((n, blocks), np.float32),
        }
        if scheme not in _SYMMETRIC:
            shapes[f"{name}_zero_points"] = ((n, (blocks + 1) // 2), np.uint8)
        return shapes
    if scheme == "int8":
        return {
            f"{name}_Q8": ((n, blocks, block_size), np.uint8),
            f"{name}_scales": ((n, blocks), np.float32),
        }
    return {f"{name}_quantized": ((k, n), np.int8), f"{name}_scale": ((), np.float32),
            f"{name}_zero_point": ((), np.int8)}  # fmt: skip


def quantized_arrays(
    scheme: str, source, init: onnx.TensorProto, folder: Path, block_size: int, hessian, factors
) -> dict:
    """Quantize one weight: `source` (a write_model value) or the export's initializer."""
    weight = read_initializer(init, folder) if source is None else value_array(source, init)
    if hessian is not None:
        return gptq_arrays(scheme, weight, init.name, block_size, hessian, factors)
    if scheme in BLOCKED_SCHEMES:
        return _blocks(scheme, weight, init.name, block_size)
    return _int8(weight, init.name)


def _blocks(scheme: str, weight: np.ndarray, name: str, block_size: int) -> dict[str, np.ndarray]:
    """MatMulNBits blocks of a [K, N] weight, as array_shapes lays them out, from onnxruntime's kernel.

    int4 is asymmetric: each block maps its own min..max, zero points packed two per byte. int8 and
    int4-sym are symmetric: each block maps -amax..amax, stored offset by 128 / 8 (MatMulNBits'
    default zero point without a zero-point input).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    bits, symmetric = BLOCKED_SCHEMES[scheme], scheme in _SYMMETRIC
    arrays = {
        key: np.zeros(shape, dtype)
        for key, (shape, dtype) in array_shapes(scheme, (k, n), name, block_size).items()
    }
    blocks = arrays[f"{name}_scales"].shape[1]
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    # The kernel takes a zero-point buffer either way; a symmetric scheme stores none.
    zero_points = np.zeros((n, blocks), np.uint8) if symmetric else arrays[f"{name}_zero_points"]
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(
        arrays[f"{name}_Q{bits}"], padded, arrays[f"{name}_scales"], zero_points, block_size, n, k, symmetric
    )
    return arrays


def factor_cache():
    """GPTQ's cache of Hessian factors, shared by the weights quantized in write order."""
    from adaptrix.targets.onnx.gptq import FactorCache  # torch: only when calibrating

    return FactorCache()


def gptq_arrays(scheme: str, weight: np.ndarray, name: str, block_size: int, hessian, factors=None) -> dict:
    """The MatMulNBits arrays of _blocks' layout, rounded by GPTQ: codes packed low nibble first."""
    from adaptrix.targets.onnx.gptq import gptq_blocks

    bits = BLOCKED_SCHEMES[scheme]
    codes, scales, zeros = gptq_blocks(weight, hessian, bits, block_size, scheme in _SYMMETRIC, factors)
    n, blocks = scales.shape
    if bits == 8:
        return {f"{name}_Q8": codes.reshape(n, blocks, block_size), f"{name}_scales": scales}
    pairs = codes.reshape(n, blocks, block_size // 2, 2)
    if scheme in _SYMMETRIC:  # codes offset by 8, MatMulNBits' zero point without a zero-point input
        return {f"{name}_Q4": pairs[..., 0] | (pairs[..., 1] << 4), f"{name}_scales": scales}
    padded = np.zeros((n, 2 * ((blocks + 1) // 2)), np.uint8)
    padded[:, :blocks] = zeros
    return {
        f"{name}_Q4": pairs[..., 0] | (pairs[..., 1] << 4),
        f"{name}_scales": scales,
        f"{name}_zero_points": padded[:, 0::2] | (padded[:, 1::2] << 4),
    }


def _int8(weight: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """int8-dynamic: symmetric per-tensor int8 of a weight, as quantize_dynamic's QInt8 weights.

    Not per column: onnxruntime's u8s8 kernels on AVX2 add pairs of products in int16 and saturate
    when many weights sit near +-127, which a scale per column makes common (measured: greedy
    agreement 89.8% per column, 98.8% per tensor; 98.0% per column at half range).
    """
    amax = float(np.abs(weight).max())
    scale = np.float32(amax / _INT8_MAX if amax > 0 else 1.0)
    quantized = np.clip(np.rint(np.asarray(weight, dtype=np.float32) / scale), -_INT8_MAX, _INT8_MAX)
    return {
        f"{name}_quantized": quantized.astype(np.int8),
        f"{name}_scale": np.array(scale, dtype=np.float32),
        f"{name}_zero_point": np.array(0, dtype=np.int8),
    }
