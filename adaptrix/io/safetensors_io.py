"""The safetensors container at the byte level: header parsing and a streaming writer.

The safetensors library reads tensors (memory-mapped) and is used for that; it has no way to
write a file one tensor at a time, which a merge of a model larger than memory needs, and no
way to tell where a tensor's bytes lie, which a raw copy needs. Both are here, following the
format's specification: an 8-byte little-endian header length, a JSON header, the data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adaptrix.io.jsonfile import loads_strict
from adaptrix.io.stream import HashingWriter
from adaptrix.ir.errors import BadInputError

__all__ = [
    "DTYPES",
    "MAX_NAME",
    "TensorInfo",
    "dtype_name",
    "read_elements",
    "read_header",
    "read_tensor",
    "write_safetensors",
]

DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DIMS = 16
MAX_NAME = 1024  # characters in a tensor name; real ones have under 200
_COPY_PIECE = 8 << 20  # an unchanged tensor is read and written in pieces of at most this


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return _NAMES[dtype]


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: tensors by name, and the metadata.

    The rules are the safetensors library's: every dimension a non-negative integer, each
    tensor's bytes exactly its shape's, the tensors' byte ranges back to back from the start of
    the data to the end of the file (no overlap, no hole, nothing after). A raw copy of a
    tensor's bytes relies on them: overlapping ranges would build one tensor from another's bytes.
    """
    fix = "the file is truncated or not safetensors; copy or re-save it"
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise BadInputError("is too short to be safetensors", path=file, fix=fix)
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise BadInputError("has a header longer than the file", path=file, fix=fix)
            text = handle.read(length)
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror})", path=file) from None
    header = loads_strict(text, path=file, what="safetensors header")
    if not isinstance(header, dict):
        raise BadInputError("has a header that is not a JSON object", path=file, fix=fix)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError("has __metadata__ that is not a map of strings", path=file, fix=fix)
    data_start = 8 + length
    tensors = {name: _tensor_info(name, entry, file, data_start, fix) for name, entry in header.items()}
    _check_layout(tensors.values(), file, data_start, size, fix)
    return tensors, metadata


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """Read one tensor through a memory map opened for this read only (pages never pile up in RSS)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name)
    except SafetensorError as exc:
        raise BadInputError(f"cannot read tensor {name!r} ({exc})", path=file) from None


def read_elements(info: TensorInfo, flat_indices: Iterable[int]) -> torch.Tensor:
    """A few elements of a stored tensor, by flat index, read straight from the file (as float32)."""
    size = info.dtype.itemsize
    with info.file.open("rb") as handle:
        chunks = []
        for index in flat_indices:
            handle.seek(info.start + index * size)
            chunks.append(handle.read(size))
    data = bytearray(b"".join(chunks))
    if not data:
        return torch.empty(0)
    return torch.frombuffer(data, dtype=info.dtype).to(torch.float32)


def _finisher(
    source: TensorInfo, change: Callable[[torch.Tensor], None] | None, done: Callable[[int], None] | None
) -> Callable | None:
    """The compute of a tensor's last piece: `change` on the whole tensor, then `done`."""
    if change is None and done is None:
        return None

    def finish(view) -> None:
        if change is not None:  # a changed tensor is one piece: the view holds all of it
            change(torch.from_numpy(view).view(source.dtype).reshape(source.shape))
        if done is not None:
            done(source.nbytes)

    return finish


def _tensor_info(name: str, entry: object, file: Path, data_start: int, fix: str) -> TensorInfo:
    """One header entry, checked on its own: dtype known, dimensions and offsets plain integers."""
    if len(name) > MAX_NAME or not name.isprintable():
        raise BadInputError(f"names a tensor {name[:80]!r}: longer than {MAX_NAME} characters or with "
                            "control characters", path=file, fix=fix)  # fmt: skip
    try:
        dtype = DTYPES[entry["dtype"]]
        shape, offsets = tuple(entry["shape"]), tuple(entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"has a malformed header entry for {name!r}", path=file, fix=fix) from None
    numbers = (*shape, *offsets)
    if len(offsets) != 2 or len(shape) > _MAX_DIMS or not all(_size(n) for n in numbers):
        raise BadInputError(
            f"tensor {name!r} has a shape or data_offsets that are not non-negative integers "
            f"(at most {_MAX_DIMS} dimensions)",
            path=file,
            fix=fix,
        )
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise BadInputError(
            f"tensor {name!r} has shape {list(shape)} ({dtype_name(dtype)}) but {end - begin} bytes "
            f"of data", path=file, fix=fix,
        )  # fmt: skip
    return TensorInfo(name, dtype, shape, file, data_start + begin, end - begin)


def _size(value: object) -> bool:
    """Whether a header number is a plain non-negative integer torch can hold."""
    return type(value) is int and 0 <= value < 2**62


def _check_layout(infos: Iterable[TensorInfo], file: Path, data_start: int, size: int, fix: str) -> None:
    """The tensors' byte ranges lie back to back from the data's start and fill it to the file's end."""
    at = data_start
    for info in sorted(infos, key=lambda i: (i.start, i.nbytes)):
        if info.start != at:
            what = "overlaps the tensor before it" if info.start < at else "leaves a gap before it"
            raise BadInputError(f"tensor {info.name!r} {what} in the file's data", path=file, fix=fix)
        at += info.nbytes
    if at != size:
        where = "past the end of the file" if at > size else "short of the file's end"
        raise BadInputError(f"has tensor data that ends {where} ({at} of {size} bytes)", path=file, fix=fix)


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor to be written: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes it takes."""
        return math.prod(self.shape) * self.dtype.itemsize


class write_safetensors:  # noqa: N801 - used as a context manager, reads like a function
    """Write a safetensors file tensor by tensor, in the planned order, never holding more than one.

    The file is laid out from the plan and filled by a HashingWriter, which hashes it as it fills:
    `digest` is the file's sha256 once the block has ended without an error.
    """

    def __init__(self, file: Path, planned: Iterable[PlannedTensor], metadata: Mapping[str, str]):
        self.file = file
        self.planned = list(planned)
        self.metadata = dict(metadata)
        self.digest: str | None = None
        self._next = 0
        self._writer: HashingWriter | None = None

    def __enter__(self) -> write_safetensors:
        """Create the file and write the header."""
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for item in self.planned:
            header[item.name] = {
                "dtype": dtype_name(item.dtype),
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._writer = HashingWriter(self.file, 8 + len(text) + offset)
        self._writer.put(struct.pack("<Q", len(text)) + text)
        return self

    def _expect(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        item = self.planned[self._next]
        if (name, dtype, shape) != (item.name, item.dtype, item.shape):
            raise ValueError(f"{self.file}: got {name} {dtype} {list(shape)}, planned {item}")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor's bytes."""
        self._expect(name, tensor.dtype, tuple(tensor.shape))
        if tensor.numel():
            self._writer.put(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def write_each(
        self,
        items: Sequence[tuple[str, TensorInfo, Callable[[torch.Tensor], None] | None]],
        done: Callable[[int], None] | None = None,
    ) -> None:
        """Write the next planned tensors from a source's bytes, each edited in place by its function.

        The function (None: the bytes as they are) gets the tensor, in the source's dtype and
        shape, in the writer's staging buffer; meanwhile the next tensors are read. `done(nbytes)`
        is called after each tensor.
        """
        jobs = []
        for name, source, change in items:
            self._expect(name, source.dtype, source.shape)
            step = source.nbytes if change is not None else _COPY_PIECE  # a copy: in bounded pieces
            starts = range(0, source.nbytes, step) if source.nbytes else ()
            jobs += [(min(step, source.nbytes - at), None, (source.file, source.start + at)) for at in starts]
            if starts:  # the last piece runs `change` on the whole tensor (one piece), then `done`
                length, _, where = jobs[-1]
                jobs[-1] = (length, _finisher(source, change, done), where)
            elif done is not None:  # an empty tensor: nothing to write
                done(0)
        self._writer.fill_each(jobs)

    def __exit__(self, *exc_info: object) -> None:
        """Finish the file; a complete write must have written every planned tensor."""
        if exc_info[0] is not None:
            self._writer.abort()
            return
        if self._next != len(self.planned):
            self._writer.abort()
            raise ValueError(f"{self.file}: wrote {self._next} of {len(self.planned)} tensors")
        self.digest = self._writer.close()
