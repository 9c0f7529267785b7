"""Write a graph and its weights as `model.onnx` + `model.onnx_data`, copying unchanged weights.

Unchanged initializers are copied from the cached export's data file in the kernel; changed and
new ones are written from arrays. Large tensors start on 64 KiB boundaries, as onnx aligns them,
so that onnxruntime can memory-map them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptrix.toolchain.errors import BadInputError
from adaptrix.toolchain.fileio import copy_range, write_all

__all__ = ["external_location", "read_initializer", "write_model"]

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
    where = external_location(init)
    if where is None:
        return numpy_helper.to_array(init)
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    location, offset, length = where
    if length != int(np.prod(init.dims, dtype=np.int64)) * np.dtype(dtype).itemsize:
        raise BadInputError(f"initializer {init.name} has {length} bytes for shape {list(init.dims)}",
                            path=folder / location, fix="clear the ONNX cache directory")  # fmt: skip
    return np.memmap(folder / location, dtype=dtype, mode="r", offset=offset, shape=tuple(init.dims))


def write_model(
    model: onnx.ModelProto,
    source: Path,
    values: Mapping[str, np.ndarray | Callable[[], np.ndarray]],
    out: Path,
    data_name: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write `model` into `out`: initializers in `values` get new data, the rest keep `source`'s.

    A value may be a function: it is called when its initializer is written and dropped after,
    so at most one new tensor is in memory at a time.
    """
    data_path = out / data_name
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for init in model.graph.initializer:
            where = external_location(init)
            if init.name not in values and where is None:
                continue  # small, kept inside the graph
            length = _nbytes(init, values)
            if length >= _ALIGN_ABOVE and offset % _ALIGN:
                pad = _ALIGN - offset % _ALIGN
                write_all(fd, bytes(pad))
                offset += pad
            if init.name in values:
                value = values[init.name]
                value = value() if callable(value) else value
                _check_value(init, value)
                write_all(fd, np.ascontiguousarray(value).reshape(-1).view(np.uint8))
            else:
                copy_range(source / where[0], fd, where[1], where[2])
            _point_to(init, data_name, offset, length)
            offset += length
            if progress:
                progress(length)
    finally:
        os.close(fd)
    with (out / "model.onnx").open("wb") as handle:
        handle.write(model.SerializeToString())


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
