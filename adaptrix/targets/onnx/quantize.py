"""Weight quantization after the merge, with onnxruntime's own quantizers.

int8: dynamic quantization (MatMulInteger, activations quantized per call). int4: MatMulNBits
with blocks of `block_size` along the input, symmetric, computed with int8 activations
(accuracy level 4), as onnxruntime-genai's CPU models are. LoRA branches of an unmerged graph
stay in float: quantizing them would turn their overridable inputs into constants.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=list(exclude), use_external_data_format=True)  # fmt: skip
        return onnx.load(target, load_external_data=True)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(source, load_external_data=True),
        bits=4,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=_INT4_ACCURACY_LEVEL,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model
