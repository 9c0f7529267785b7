"""Weight quantization after the merge, with onnxruntime's own quantizers.

int8: dynamic quantization (MatMulInteger, activations quantized per call). int4: MatMulNBits
with blocks of `block_size` along the input, symmetric, computed with int8 activations
(accuracy level 4), as onnxruntime-genai's CPU models are. LoRA branches of an unmerged graph
stay in float: quantizing them would turn their overridable inputs into constants.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx

from adaptrix.toolchain.errors import BadInputError

__all__ = ["QUANTIZE_SCHEMES", "check_quantize", "quantize_model"]

logger = logging.getLogger(__name__)

QUANTIZE_SCHEMES = ("int8", "int4")
_INT4_ACCURACY_LEVEL = 4


def check_quantize(scheme: str | None, block_size: int) -> None:
    """Refuse an unknown scheme or a block size that is not a power of two >= 16."""
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise BadInputError(f"unknown --quantize {scheme!r}",
                            fix=f"choose one of: {', '.join(QUANTIZE_SCHEMES)}")  # fmt: skip
    if block_size < 16 or block_size & (block_size - 1):
        raise BadInputError(f"--block-size {block_size} is not a power of two >= 16", fix="use 32, 64 or 128")


def quantize_model(
    source: Path, scheme: str, block_size: int, exclude: Sequence[str], work: Path
) -> onnx.ModelProto:
    """The quantized graph of the model file `source` (weights loaded), written via `work`."""
    check_quantize(scheme, block_size)
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = work / "int8.onnx"
        with _quiet_root_logger():  # it advises shape pre-processing on the root logger, every time
            quantize_dynamic(source, target, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=list(exclude),
                             use_external_data_format=True)  # fmt: skip
        return onnx.load(target, load_external_data=True)
    with _quiet_root_logger():  # the module calls logging.basicConfig(level=INFO) when imported
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    model = onnx.load(source, load_external_data=True)
    _gemms_to_matmuls(model)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=_INT4_ACCURACY_LEVEL,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model


def _gemms_to_matmuls(model: onnx.ModelProto) -> None:
    """Rewrite each plain Gemm with a constant weight (GPT-2's Conv1D) as MatMul + Add, in place.

    MatMulNBits replaces MatMuls only; without this a GPT-2 graph would keep every projection
    in float. Gemms that transpose or scale an input (classifier heads) stay as they are.
    """
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 0
        plain = plain and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or not plain or node.input[1] not in initializers:
            nodes.append(node)
            continue
        stem = node.name.rpartition("/")[0] or node.name
        product = f"{stem}/MatMul_output_0"
        nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=f"{stem}/MatMul"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{stem}/Add")
            )
        else:
            nodes[-1].output[0] = node.output[0]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Keep onnxruntime's quantizers from configuring or writing to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def drop(record: logging.LogRecord) -> bool:
        return record.name != "root"

    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.handlers[:] = handlers
        root.setLevel(level)
