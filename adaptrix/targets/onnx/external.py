"""Write a graph and its weights as `model.onnx` + `model.onnx_data`, copying unchanged weights.

Unchanged initializers are copied from the cached export's data file, and so are the base
weights a merge adds to in place (read into the writer's staging buffer, changed there); new
values are computed while the ones before are written and hashed (HashingWriter). Large
tensors start on 64 KiB boundaries, as onnx aligns them, so that onnxruntime can memory-map them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptrix.artifacts import MODEL_NAME
from adaptrix.io.stream import HashingWriter, read_range
from adaptrix.ir.errors import BadInputError

__all__ = [
    "Filler",
    "external_location",
    "initializer_bytes",
    "read_initializer",
    "value_array",
    "write_model",
]

_ALIGN = 64 * 1024
_ALIGN_ABOVE = 1 << 20


def external_location(init: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(file, offset, length) of an initializer stored outside the graph, or None."""
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in init.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def read_initializer(init: onnx.TensorProto, folder: Path) -> np.ndarray:
    """An initializer's value (memory-mapped when it is stored externally)."""
    if external_location(init) is None:
        return numpy_helper.to_array(init)
    path, offset = initializer_bytes(init, folder)
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(init.dims))


def initializer_bytes(init: onnx.TensorProto, folder: Path) -> tuple[Path, int]:
    """(file, offset) of an external initializer's bytes, checked against its dtype and shape."""
    location, offset, length = external_location(init)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    if length != int(np.prod(init.dims, dtype=np.int64)) * itemsize:
        raise BadInputError(f"initializer {init.name} has {length} bytes for shape {list(init.dims)}",
                            path=folder / location, fix="clear the ONNX cache directory")  # fmt: skip
    return folder / location, offset


def write_model(
    model: onnx.ModelProto,
    source: Path,
    values: Mapping[str, np.ndarray | Callable[[], np.ndarray] | Filler],
    out: Path,
    data_name: str,
    progress: Callable[[int], None] | None = None,
    model_name: str = MODEL_NAME,
) -> str:
    """Write `model` into `out`: initializers in `values` get new data, the rest keep `source`'s.

    A value may be an array, a function called when its initializer is written, or a `Filler`
    that computes straight into the bytes being written. Unchanged initializers are copied, and
    everything is written and hashed while the next value is computed (HashingWriter).
    Returns the sha256 of the data file.
    """
    layout, size = [], 0
    for init in model.graph.initializer:
        where = external_location(init)
        if init.name not in values and where is None:
            continue  # small, kept inside the graph
        length = _nbytes(init, values)
        if length >= _ALIGN_ABOVE and size % _ALIGN:
            size += _ALIGN - size % _ALIGN
        layout.append((init, where, size, length))
        size += length
    with HashingWriter(out / data_name, size) as writer:
        for init, where, offset, length in layout:
            writer.skip(offset - writer.offset)
            if init.name in values:
                _put_value(writer, init, values[init.name], length)
            else:
                writer.copy(source / where[0], where[1], where[2])
            _point_to(init, data_name, offset, length)
            if progress:
                progress(length)
        digest = writer.close()
    with (out / model_name).open("wb") as handle:
        handle.write(model.SerializeToString())
    return digest


class Filler(ABC):
    """A new initializer value computed into the output's bytes, which write_model provides."""

    def start_bytes(self) -> tuple[Path, int] | None:
        """(file, offset) of the bytes `out` holds when `fill` is called; None: anything."""
        return None

    @abstractmethod
    def fill(self, out: np.ndarray) -> None:
        """Make `out` (the initializer's dtype and shape) the value."""


def value_array(value: np.ndarray | Callable[[], np.ndarray] | Filler, init: onnx.TensorProto) -> np.ndarray:
    """The array a value of write_model's `values` stands for (computed now for a function or Filler)."""
    if isinstance(value, Filler):
        out = np.empty(tuple(init.dims), helper.tensor_dtype_to_np_dtype(init.data_type))
        if (start := value.start_bytes()) is not None:
            with start[0].open("rb") as handle:
                read_range(handle.fileno(), out.reshape(-1).view(np.uint8), start[1], start[0])
        value.fill(out)
        return out
    return value() if callable(value) else value


def _put_value(writer: HashingWriter, init: onnx.TensorProto, value, length: int) -> None:
    if isinstance(value, Filler):
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        shape = tuple(init.dims)
        writer.fill(
            length, lambda view: value.fill(view.view(dtype).reshape(shape)), source=value.start_bytes()
        )
        return
    value = value_array(value, init)
    _check_value(init, value)
    writer.put(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def _nbytes(init: onnx.TensorProto, values: Mapping) -> int:
    if init.name in values:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        return int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return external_location(init)[2]


def _check_value(init: onnx.TensorProto, value: np.ndarray) -> None:
    expected = helper.tensor_dtype_to_np_dtype(init.data_type)
    if value.dtype != expected or tuple(value.shape) != tuple(init.dims):
        raise ValueError(f"{init.name}: new value {value.dtype}{list(value.shape)}, "
                         f"initializer {expected}{list(init.dims)}")  # fmt: skip


def _point_to(init: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make an initializer refer to bytes of the external data file."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
