"""Weight quantization after the merge, one weight at a time, inside the single write of the model.

Each MatMul / plain Gemm with a constant float32 weight becomes MatMulNBits or
DynamicQuantizeMatMul; the schemes and the arrays they store are in quantize_schemes.py. Nothing
else loads the model: write_model asks for a weight's quantized arrays when it reaches them, and
only then is that one weight merged (or memory-mapped from the cached export) and quantized. LoRA
branches of an unmerged graph stay in float (their weights are overridable graph inputs), and so
do bottleneck adapters (small, kept exact).
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
from adaptrix.targets.onnx.quantize_schemes import (
    BLOCKED_SCHEMES,
    array_shapes,
    check_quantize,
    factor_cache,
    quantized_arrays,
)

__all__ = ["QuantizeReport", "quantize_weights"]

logger = logging.getLogger(__name__)

_ACCURACY_LEVEL = 4


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    """What quantize_weights changed: nodes rewritten, bytes before and after, and why others were not."""

    quantized: int
    float_bytes: int
    quantized_bytes: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    gptq: int = 0  # weights rounded by GPTQ (the rest: to nearest)


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
    factors = factor_cache() if hessians else None  # shared by the weights, in write order
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
            shapes = array_shapes(scheme, tuple(init.dims), init.name, block_size)
            hessian = (hessians or {}).get(init.name) if scheme in BLOCKED_SCHEMES else None
            if hessian is not None and hessian.shape != (init.dims[0], init.dims[0]):
                raise BadInputError(f"--calibration: {init.name} reads {init.dims[0]} inputs, its "
                                    f"statistics are {list(hessian.shape)}")  # fmt: skip
            gptq += hessian is not None
            pending = _Pending(
                partial(quantized_arrays, scheme, source, init, folder, block_size, hessian, factors)
            )
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
