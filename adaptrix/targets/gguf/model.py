"""One GGUF model file: metadata (hyperparameters, tokenizer), then the merged tensors streamed one by one.

The tensor infos are written first from the planned shapes; each tensor's data is then merged,
rewritten and quantized only when its turn comes, so the whole model is never in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.head import new_head_sites, refuse_new_head
from adaptrix.lowering.merge_bottleneck import fold_bottlenecks
from adaptrix.lowering.tensor_plan import plan_tensors
from adaptrix.targets.gguf.families import GgufFamily
from adaptrix.targets.gguf.rope import add_rope_scaling, rope_tensors
from adaptrix.targets.gguf.tensors import QTYPES, GgufTensor, gguf_tensors, tensor_chunks
from adaptrix.targets.gguf.vocab import add_vocab

__all__ = ["FILE_TYPES", "write_model_gguf"]

logger = logging.getLogger(__name__)

_F = gguf.LlamaFileType
FILE_TYPES = {"f32": _F.ALL_F32, "f16": _F.MOSTLY_F16, "bf16": _F.MOSTLY_BF16, "q8_0": _F.MOSTLY_Q8_0,
              "q4_0": _F.MOSTLY_Q4_0, "q4_1": _F.MOSTLY_Q4_1, "q5_0": _F.MOSTLY_Q5_0,
              "q5_1": _F.MOSTLY_Q5_1}  # fmt: skip


def write_model_gguf(
    ir: AdapterIR,
    base: Checkpoint,
    file: Path,
    family: GgufFamily,
    quantize: str,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the base with `ir` merged into GGUF file `file`; return the manifest's record of it."""
    ir = fold_bottlenecks(ir, base)  # linear bottlenecks become weight deltas; others are refused
    refuse_new_head(ir, base, new_head_sites(ir, base))
    items, untied = plan_tensors(ir, base)
    tensors, kept = gguf_tensors(items, base, family, QTYPES[quantize], untied)
    writer = gguf.GGUFWriter(file, gguf.MODEL_ARCH_NAMES[family.arch])
    vocab = add_metadata(writer, base, family, quantize)
    extra = rope_tensors(base.config)  # first, as the converter writes them
    for name, value in extra:
        writer.add_tensor_info(name, value.shape, value.dtype, value.nbytes)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=tensor.qtype)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, value in extra:
        writer.write_tensor_data(value)
    for tensor in tensors:
        writer.write_tensor_data(_Chunked(tensor, base, family))  # type: ignore[arg-type]
        if progress is not None:
            progress(sum(base.tensors[item.source].nbytes for item in tensor.items if item.source))
    writer.close()
    logger.info("wrote %s: %d tensors, %s", file, len(tensors), quantize)
    return {"quantize": quantize, "architecture": gguf.MODEL_ARCH_NAMES[family.arch],
            "tensors": len(extra) + len(tensors), "untied_lm_head": untied, "kept_f16": kept,
            "tokenizer": vocab}  # fmt: skip


def add_metadata(writer: gguf.GGUFWriter, base: Checkpoint, family: GgufFamily, quantize: str) -> dict:
    """The model's metadata as the converter writes it: general keys, hyperparameters, tokenizer."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(base.path.name)
    family.hparams(writer, base.config)
    add_rope_scaling(writer, base.config)
    writer.add_file_type(FILE_TYPES[quantize])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return add_vocab(writer, base.path, base.source.vocab_size)


class _Chunked:
    """A tensor's data as GGUFWriter.write_tensor_data takes it (nbytes, tofile), rounded by row blocks."""

    def __init__(self, tensor: GgufTensor, base: Checkpoint, family: GgufFamily):
        self.tensor, self.base, self.family = tensor, base, family
        self.nbytes = tensor.nbytes

    def tofile(self, out) -> None:
        """Write the blocks one after another; check the total is the size the tensor info announced."""
        written = 0
        for chunk in tensor_chunks(self.tensor, self.base, self.family):
            chunk.tofile(out)
            written += chunk.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"{self.tensor.name}: wrote {written} bytes, announced {self.nbytes}")
