"""Builders for ONNX adapter tests: an unmerged two-adapter artifact and `.onnx_adapter` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from builders import make_adapter

from adaptrix.api.compile import compile_adapter


def two_adapter_unmerged(base: Path, tmp: Path) -> Path:
    """A llama onnx-cpu --unmerged artifact with adapters `one` (defaults) and `two` (r 2, q and v)."""
    one = make_adapter("llama", base, tmp / "one")
    two = make_adapter("llama", base, tmp / "two", seed=3, r=2, target_modules=["q_proj", "v_proj"])
    return compile_adapter([one, two], base, "onnx-cpu", tmp / "unmerged", options={"unmerged": True}).out


def write_onnx_adapter(path: Path, params: dict[str, np.ndarray], version: int) -> Path:
    """An onnxruntime adapter file holding `params` for the base export of model version `version`."""
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(version)
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    writer.export_adapter(str(path))
    return path
