"""One GGUF model file: metadata (hyperparameters, tokenizer), then the merged tensors streamed one by one.

The tensor infos are written first from the planned shapes; each tensor's data is then merged,
rewritten and quantized only when its turn comes (the next one merged meanwhile), so the whole
model is never in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.stream import HashingWriter
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.head import new_head_sites, refuse_new_head
from adaptrix.lowering.merge_bottleneck import fold_bottlenecks
from adaptrix.lowering.tensor_plan import plan_tensors
from adaptrix.targets.gguf.families import GgufFamily
from adaptrix.targets.gguf.quantize import one_torch_thread
from adaptrix.targets.gguf.rope import add_rope_scaling, rope_tensors
from adaptrix.targets.gguf.tensors import QTYPES, GgufTensor, gguf_tensors, round_rows, source_value
from adaptrix.targets.gguf.vocab import add_vocab

__all__ = ["FILE_TYPES", "write_model_gguf"]

logger = logging.getLogger(__name__)

_F = gguf.LlamaFileType
FILE_TYPES = {"f32": _F.ALL_F32, "f16": _F.MOSTLY_F16, "bf16": _F.MOSTLY_BF16, "q8_0": _F.MOSTLY_Q8_0,
              "q4_0": _F.MOSTLY_Q4_0, "q4_1": _F.MOSTLY_Q4_1, "q5_0": _F.MOSTLY_Q5_0,
              "q5_1": _F.MOSTLY_Q5_1}  # fmt: skip
_BUFFER_ELEMENTS = 64 << 20  # float32 elements: larger tensors (embeddings, heads) are merged into their own


def write_model_gguf(
    ir: AdapterIR,
    base: Checkpoint,
    file: Path,
    family: GgufFamily,
    quantize: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, str]:
    """Write the base with `ir` merged into GGUF file `file`; return the manifest's record and the sha256."""
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
    writer.open_output_file()
    writer.fout[0].close()  # the file GGUFWriter opened: written through HashingWriter instead
    streamed = writer.fout[0] = _Streamed(file)  # type: ignore[assignment,list-item]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    streamed.start(extra, tensors, writer.data_alignment)
    try:
        with one_torch_thread():
            for _, value in extra:
                writer.write_tensor_data(_Rounded(value))  # type: ignore[arg-type]
            for tensor, value in _merged_ahead(tensors, base, family):
                writer.write_tensor_data(_Rounded(value, tensor))  # type: ignore[arg-type]
                if progress is not None:
                    progress(sum(base.tensors[i.source].nbytes for i in tensor.items if i.source))
    except BaseException:
        streamed.abort()  # the writing threads stop; the unfinished file goes with the temporary folder
        raise
    writer.close()
    logger.info("wrote %s: %d tensors, %s", file, len(tensors), quantize)
    return {"quantize": quantize, "architecture": gguf.MODEL_ARCH_NAMES[family.arch],
            "tensors": len(extra) + len(tensors), "untied_lm_head": untied, "kept_f16": kept,
            "tokenizer": vocab}, streamed.digest  # fmt: skip


def add_metadata(writer: gguf.GGUFWriter, base: Checkpoint, family: GgufFamily, quantize: str) -> dict:
    """The model's metadata as the converter writes it: general keys, hyperparameters, tokenizer."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(base.path.name)
    family.hparams(writer, base.config)
    if family.from_tensors is not None:
        family.from_tensors(writer, base)
    add_rope_scaling(writer, base.config)
    writer.add_file_type(FILE_TYPES[quantize])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return add_vocab(writer, base.path, base.source.vocab_size, family.sentencepiece)


def _merged_ahead(
    tensors: list[GgufTensor], base: Checkpoint, family: GgufFamily
) -> Iterator[tuple[GgufTensor, torch.Tensor]]:
    """Each tensor with its value before rounding, the next one merged on a thread meanwhile.

    torch's kernels and llama.cpp's quantizer release the GIL, so the merge of one tensor overlaps
    the rounding and writing of the one before. Two float32 buffers the size of the largest tensor
    merged in them (at most _BUFFER_ELEMENTS each) take the merges in turn: their pages are
    allocated once, not per tensor. A buffer is merged into again only once its tensor is written.
    """
    if not tensors:
        return
    merged = [math.prod(t.shape) for t in tensors if len(t.items) == 1 and t.items[0].touched]
    largest = max(merged, default=0)
    size = largest if largest <= _BUFFER_ELEMENTS else 0
    buffers = [torch.empty(size, dtype=torch.float32) for _ in range(2)] if size else [None, None]
    with ThreadPoolExecutor(1, thread_name_prefix="adaptrix-gguf-merge") as pool:
        pending = pool.submit(source_value, tensors[0], base, family, buffers[0])
        for index, tensor in enumerate(tensors):
            value = pending.result()
            if index + 1 < len(tensors):
                buffer = buffers[(index + 1) % 2]
                pending = pool.submit(source_value, tensors[index + 1], base, family, buffer)
            yield tensor, value


class _Rounded:
    """Data as GGUFWriter.write_tensor_data takes it (nbytes, tofile): an array, or a tensor rounded."""

    def __init__(self, value: torch.Tensor | np.ndarray, tensor: GgufTensor | None = None):
        self.tensor, self.value = tensor, value
        self.nbytes = value.nbytes if tensor is None else tensor.nbytes

    def tofile(self, out: _Streamed) -> None:
        """Write the blocks one after another; check the total is the size the tensor info announced."""
        if self.tensor is None:
            out.write(np.ascontiguousarray(self.value))
            return
        written = 0
        for chunk in round_rows(self.value, self.tensor.qtype):
            out.write(chunk)
            written += chunk.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"{self.tensor.name}: wrote {written} bytes, announced {self.nbytes}")


class _Streamed:
    """The file GGUFWriter writes into, through HashingWriter once its size is known.

    Header, metadata and tensor infos are kept in memory until then; everything goes out with
    direct I/O and is hashed as written: no page-cache copy, no reread for the manifest's digest.
    """

    def __init__(self, path: Path):
        self.path = path
        self._head = bytearray()
        self._out: HashingWriter | None = None
        self._offset = 0
        self.digest = ""

    def start(self, extra: list[tuple[str, np.ndarray]], tensors: list[GgufTensor], alignment: int) -> None:
        """Open the file at its final size: what was written, padded, then each tensor padded."""
        size = _padded(len(self._head), alignment)
        size += sum(_padded(value.nbytes, alignment) for _, value in extra)
        size += sum(_padded(tensor.nbytes, alignment) for tensor in tensors)
        self._out = HashingWriter(self.path, size)
        self._out.put(bytes(self._head))
        self._head = bytearray()

    def write(self, data) -> int:
        """Append a buffer's bytes (copied before this returns)."""
        view = memoryview(data).cast("B")
        if self._out is None:
            self._head += view
        elif view.nbytes:
            self._out.put(view)
        self._offset += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        """The position in the file."""
        return self._offset

    def flush(self) -> None:
        """Nothing to do: HashingWriter writes its pieces as they fill."""

    def abort(self) -> None:
        """Stop after what is in flight, without raising (the caller is already failing)."""
        if self._out is not None:
            self._out.abort()
            self._out = None

    def close(self) -> None:
        """Wait for the writes and the hash (GGUFWriter.close calls it)."""
        if self._out is not None and not self.digest:
            self.digest = self._out.close()


def _padded(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment
