"""`adaptrix inspect` for onnxruntime `.onnx_adapter` files: their parameters, per name.

An unmerged ONNX artifact ships one such file per adapter (`adapters/NAME.onnx_adapter`): LoRA
pairs `<module>.lora_A` [in, rank] / `.lora_B` [rank, out] and IA3 vectors `.ia3_out` / `.ia3_in`,
with the model version of the base export they fit.
"""

from __future__ import annotations

import math
from pathlib import Path

from adaptrix.artifacts import ADAPTER_SUFFIX as SUFFIX

__all__ = ["inspect_onnx_adapter", "is_onnx_adapter"]

_MAGIC = b"TORT"  # the flatbuffers file identifier onnxruntime writes at bytes 4..8
_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int32": 4,
               "int64": 8}  # fmt: skip
_OPS = {".lora_A": "lora_A", ".lora_B": "lora_B", ".ia3_out": "ia3_out", ".ia3_in": "ia3_in"}


def is_onnx_adapter(path: Path | str) -> bool:
    """Whether a path is an onnxruntime adapter file: by its suffix or its file identifier."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == SUFFIX:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(8)[4:] == _MAGIC
    except OSError:
        return False


def inspect_onnx_adapter(path: Path | str) -> dict:
    """Describe an `.onnx_adapter` file: versions, and each parameter's name, shape, dtype and bytes."""
    from adaptrix.runtimes.onnx.adapter import dtype_name, read_adapter

    file = Path(path)
    adapter = read_adapter(file)
    rows = []
    for name, value in sorted(adapter.get_parameters().items()):
        shape, dtype = [int(n) for n in value.shape()], dtype_name(value.data_type())
        numel = math.prod(shape)
        op = next((kind for suffix, kind in _OPS.items() if name.endswith(suffix)), None)
        rows.append({
            "module": name,
            "layer": _layer_of(name),
            "op": op or "other",
            "rank": _rank(op, shape),
            "shape": shape,
            "dtype": dtype,
            "parameters": numel,
            "bytes": numel * _ITEM_BYTES[dtype] if dtype in _ITEM_BYTES else int(value.numpy().nbytes),
        })  # fmt: skip
    return {
        "adapter": str(file),
        "format": "onnx-adapter",
        "adapter_version": adapter.get_adapter_version(),
        "model_version": adapter.get_model_version(),
        "dtypes": sorted({row["dtype"] for row in rows}),
        "modules": len({row["module"].rpartition(".")[0] for row in rows}),
        "layers": sorted({row["layer"] for row in rows if row["layer"] is not None}),
        "parameters": sum(row["parameters"] for row in rows),
        "bytes": sum(row["bytes"] for row in rows),
        "rows": rows,
    }


def _rank(op: str | None, shape: list[int]) -> int | None:
    """A LoRA half's rank: A is [in, rank], B is [rank, out]."""
    if len(shape) != 2 or op not in ("lora_A", "lora_B"):
        return None
    return shape[1] if op == "lora_A" else shape[0]


def _layer_of(name: str) -> int | None:
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None
