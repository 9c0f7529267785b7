"""Weight quantization after the merge, one weight at a time, inside the single write of the model.

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

The blocks come from onnxruntime's own kernels (quantize_matmul_8bits / _4bits), so they are
the bytes MatMulNBitsQuantizer writes; with `--calibration`, GPTQ rounds them instead (gptq.py),
in the same layout. Nothing else loads the model: write_model asks for a weight's
quantized arrays when it reaches them, and only then is that one weight merged (or
memory-mapped from the cached export) and quantized. LoRA branches of an unmerged graph stay in
float (their weights are overridable graph inputs), and so do bottleneck adapters (small, kept
exact).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptrix.ir.errors import BadInputError
from adaptrix.targets.onnx.external import read_initializer, value_array

__all__ = [
    "BLOCKED_SCHEMES",
    "DEFAULT_BLOCK_SIZE",
    "QUANTIZE_SCHEMES",
    "QuantizeReport",
    "check_quantize",
    "quantize_weights",
]

logger = logging.getLogger(__name__)

QUANTIZE_SCHEMES = ("int8", "int4", "int8-dynamic")
BLOCKED_SCHEMES = {"int8": 8, "int4": 4}  # MatMulNBits schemes: bits
_SYMMETRIC = {"int8"}  # blocked schemes without zero points
_ACCURACY_LEVEL = 4
DEFAULT_BLOCK_SIZE = 32
_INT8_MAX = 127


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    """What quantize_weights changed: nodes rewritten, bytes before and after, and why others were not."""

    quantized: int
    float_bytes: int
    quantized_bytes: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    gptq: int = 0  # weights rounded by GPTQ (the rest: to nearest)


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


def quantize_weights(
    model: onnx.ModelProto,
    folder: Path,
    values: dict[str, np.ndarray],
    scheme: str,
    block_size: int,
    exclude: Sequence[str] = (),
    hessians: Mapping[str, np.ndarray] | None = None,
) -> QuantizeReport:
    """Rewrite each MatMul / plain Gemm with a constant float32 weight in place; new weights go to `values`.

    `values` holds the patched (merged) weights; a weight not in it is read from the graph's
    external data in `folder`. Quantized float weights no other node reads leave the graph.
    A blocked scheme's weight with an entry in `hessians` (its calibration inputs' x x^T) is
    rounded by GPTQ (gptq.py), the others to nearest.
    """
    check_quantize(scheme, block_size if scheme in BLOCKED_SCHEMES else None)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:  # deduplicated constants (equal biases) are read through Identity nodes
        if node.op_type == "Identity" and node.input[0] in initializers:
            initializers.setdefault(node.output[0], initializers[node.input[0]])
    overridable = {value.name for value in graph.input}
    excluded, skipped = set(exclude), Counter()
    done: dict[str, list[str]] = {}  # float weight -> its quantized initializers (shared weights)
    float_bytes = quantized_bytes = gptq = 0
    factors = _factor_cache() if hessians else None  # shared by the weights, in write order
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        reason = _why_not(node, initializers, overridable, excluded)
        if reason is not None:
            skipped[reason] += 1
            continue
        init = initializers[node.input[1]]  # through an Identity: the initializer behind it
        if init.name not in done:
            source = values.get(init.name)  # a patched (merged) weight, or None: the export's
            shapes = _shapes(scheme, tuple(init.dims), init.name, block_size)
            hessian = (hessians or {}).get(init.name) if scheme in BLOCKED_SCHEMES else None
            if hessian is not None and hessian.shape != (init.dims[0], init.dims[0]):
                raise BadInputError(f"--calibration: {init.name} reads {init.dims[0]} inputs, its "
                                    f"statistics are {list(hessian.shape)}")  # fmt: skip
            gptq += hessian is not None
            pending = _Pending(partial(_quantize, scheme, source, init, folder, block_size, hessian, factors))
            for array_name, (shape, dtype) in shapes.items():
                graph.initializer.append(
                    onnx.TensorProto(
                        name=array_name,
                        data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                        dims=shape,
                    )
                )
                values[array_name] = partial(pending.take, array_name)
            done[init.name] = list(shapes)
            float_bytes += int(np.prod(init.dims)) * 4
            quantized_bytes += sum(
                int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes.values()
            )
        _rewrite(node, scheme, done[init.name], init.dims, block_size)
    _drop_unused(graph, set(done))
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = QuantizeReport(len(done), float_bytes, quantized_bytes, {k: v for k, v in skipped.items() if v},
                            gptq)  # fmt: skip
    logger.info("quantized %d weights to %s (%.0f MB -> %.0f MB); left in float: %s", report.quantized,
                scheme, float_bytes / 2**20, quantized_bytes / 2**20, report.skipped or "none")  # fmt: skip
    return report


def _why_not(node, initializers: dict, overridable: set[str], excluded: set[str]) -> str | None:
    """Why a MatMul's / Gemm's weight stays in float, or None when it is quantized."""
    if node.name in excluded:
        return "adapter branch (LoRA or bottleneck)"
    init = initializers.get(node.input[1])
    if init is None or node.input[1] in overridable:
        return "weight is not a constant initializer (tied head via Transpose, or a graph input)"
    if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
        return "weight is not a 2-D float32 matrix"
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0:
            return "Gemm transposes or scales an input"
        bias = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and (bias is None or len(bias.dims) != 1):
            return "Gemm bias is not a 1-D constant"
        if attrs.get("beta", 1.0) != 1.0:
            return "Gemm scales its bias"
    return None


class _Pending:
    """One weight's quantized arrays, computed when write_model reaches the first and dropped as taken."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]]):
        self._compute, self._arrays = compute, None

    def take(self, name: str) -> np.ndarray:
        """The array `name`, computing all of them on the first call."""
        if self._arrays is None:
            self._arrays = self._compute()
        return self._arrays.pop(name)


def _shapes(scheme: str, dims: tuple[int, ...], name: str, block_size: int) -> dict[str, tuple]:
    """{initializer: (shape, dtype)} of a [K, N] weight's quantized form, as _quantize makes it."""
    k, n = dims
    blocks = -(-k // block_size)
    if scheme == "int4":
        return {
            f"{name}_Q4": ((n, blocks, block_size // 2), np.uint8),
            f"{name}_scales": ((n, blocks), np.float32),
            f"{name}_zero_points": ((n, (blocks + 1) // 2), np.uint8),
        }
    if scheme == "int8":
        return {
            f"{name}_Q8": ((n, blocks, block_size), np.uint8),
            f"{name}_scales": ((n, blocks), np.float32),
        }
    return {f"{name}_quantized": ((k, n), np.int8), f"{name}_scale": ((), np.float32),
            f"{name}_zero_point": ((), np.int8)}  # fmt: skip


def _quantize(
    scheme: str, source, init: onnx.TensorProto, folder: Path, block_size: int, hessian, factors
) -> dict:
    """Quantize one weight: `source` (a write_model value) or the export's initializer."""
    weight = read_initializer(init, folder) if source is None else value_array(source, init)
    if hessian is not None:
        return _gptq_arrays(scheme, weight, init.name, block_size, hessian, factors)
    if scheme in BLOCKED_SCHEMES:
        return _blocks(scheme, weight, init.name, block_size)
    return _int8(weight, init.name)


def _blocks(scheme: str, weight: np.ndarray, name: str, block_size: int) -> dict[str, np.ndarray]:
    """MatMulNBits blocks of a [K, N] weight, as _shapes lays them out, from onnxruntime's kernel.

    int4 is asymmetric: each block maps its own min..max, zero points packed two per byte. int8 is
    symmetric: each block maps -amax..amax, stored offset by 128 (MatMulNBits' default zero point
    without a zero-point input).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    bits, symmetric = BLOCKED_SCHEMES[scheme], scheme in _SYMMETRIC
    arrays = {
        key: np.zeros(shape, dtype)
        for key, (shape, dtype) in _shapes(scheme, (k, n), name, block_size).items()
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


def _factor_cache():
    from adaptrix.targets.onnx.gptq import FactorCache  # torch: only when calibrating

    return FactorCache()


def _gptq_arrays(scheme: str, weight: np.ndarray, name: str, block_size: int, hessian, factors=None) -> dict:
    """The MatMulNBits arrays of _blocks' layout, rounded by GPTQ: codes packed low nibble first."""
    from adaptrix.targets.onnx.gptq import gptq_blocks

    bits = BLOCKED_SCHEMES[scheme]
    codes, scales, zeros = gptq_blocks(weight, hessian, bits, block_size, scheme in _SYMMETRIC, factors)
    n, blocks = scales.shape
    if bits == 8:
        return {f"{name}_Q8": codes.reshape(n, blocks, block_size), f"{name}_scales": scales}
    pairs = codes.reshape(n, blocks, block_size // 2, 2)
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


def _rewrite(node: onnx.NodeProto, scheme: str, weights: list[str], dims, block_size: int) -> None:
    """Turn a MatMul / plain Gemm into MatMulNBits or DynamicQuantizeMatMul, keeping a Gemm's bias."""
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    bits = BLOCKED_SCHEMES.get(scheme)
    if bits is not None:  # inputs A, B, scales, [zero_points], [g_idx], [bias]
        inputs = [node.input[0], *weights]
        if bias:
            inputs += [""] * (5 - len(inputs)) + [bias]
        attrs = {"K": dims[0], "N": dims[1], "bits": bits, "block_size": block_size,
                 "accuracy_level": _ACCURACY_LEVEL}  # fmt: skip
        op = "MatMulNBits"
    else:
        inputs, attrs, op = [node.input[0], *weights, *([bias] if bias else [])], {}, "DynamicQuantizeMatMul"
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
    node.op_type, node.domain = op, "com.microsoft"
    node.name = f"{node.name}_Q{bits or 8}"


def _drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the float weights in `candidates` that no node or graph output reads any more."""
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name not in candidates or init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
