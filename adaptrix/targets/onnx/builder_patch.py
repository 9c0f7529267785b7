"""Merged weights patched into onnxruntime-genai's builder graph, each found where the base's values lie.

The builder names its initializers by module, in its own words (`model.layers.0.attn.qkv_proj.
MatMul.weight`, `lm_head.MatMul.weight`, `model.layers.2.final_norm_layernorm.weight`), packs
q / k / v (and, where asked, gate / up) into one [in, q + k + v] MatMul weight and stores
MatMul weights as [in, out]. So a touched tensor of the base is looked for among the initializers
of its own layer (a tensor outside the layers: among those named after its module, as `lm_head`),
as the whole initializer or a slice of its columns (a packed MatMul weight) or rows: the one place
whose values equal the base's, exactly in the graph's dtype. No place, or more than one, is refused
with a line naming the module, never patched by guess. The merged value is then written into
that slice of a copy of the initializer; everything else of the graph is left as the builder wrote it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.tensor_plan import merged_value, plan_tensors
from adaptrix.targets.onnx.external import read_initializer
from adaptrix.targets.onnx.patch import unused_tensor

__all__ = ["Slot", "builder_patches", "locate"]

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
_PROBE_ROWS = 8  # rows of a stored [in, out] weight compared first, to find a slice's first column


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a base tensor lies in the graph: an initializer, transposed or not, from a first row / column."""

    initializer: str
    transposed: bool  # stored [in, out]: the tensor's rows are the initializer's columns
    start: int  # first column (transposed) or row (not) of the tensor inside the initializer


def builder_patches(
    ir: AdapterIR,
    base: Checkpoint,
    model: onnx.ModelProto,
    folder: Path,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """{initializer: its patched value} with the adapter merged into each touched tensor's slot."""
    items, _ = plan_tensors(ir, base)
    initializers = {init.name: init for init in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for item in (item for item in items if item.touched):
        expected = base.read(item.source).to(torch.float32).numpy()
        slot = locate(item.name, expected, initializers, folder, base)
        array = values.get(slot.initializer)
        if array is None:
            array = np.array(read_initializer(initializers[slot.initializer], folder))
            values[slot.initializer] = array
        merged = merged_value(item, base, torch.float32).numpy().astype(array.dtype)
        _write(array, slot, merged)
        if progress:
            progress(base.tensors[item.source].nbytes)
    logger.info("patched %d initializers of the builder's graph", len(values))
    return values


def locate(
    name: str, expected: np.ndarray, initializers: dict[str, onnx.TensorProto], folder: Path, base: Checkpoint
) -> Slot:
    """The one slot of the graph holding `expected` (the base's `name`), or a one-line refusal."""
    found: list[Slot] = []
    own = initializers.get(name)
    if own is not None and own.data_type in _FLOATS:
        found = _slots(name, read_initializer(own, folder), expected)
    if not found:
        for init in _candidates(name, initializers):
            found += _slots(init.name, read_initializer(init, folder), expected)
    if not found:
        raise unused_tensor(name, base)
    if len(found) > 1:
        places = ", ".join(f"{slot.initializer}[{slot.start}:]" for slot in found[:3])
        raise UnsupportedError(
            f"module {name.rpartition('.')[0]}: its base tensor {name} lies in {len(found)} places of "
            f"onnxruntime-genai's graph ({places}), so the adapter cannot be merged into one",
            path=base.path,
            fix="use --target merged or hooks for this base",
        )
    return found[0]


def _candidates(name: str, initializers: dict[str, onnx.TensorProto]):
    """The float initializers of the tensor's layer, or outside the layers those named after its module."""
    layer = _LAYER.search(name)
    module = name.rpartition(".")[0].rpartition(".")[2]
    for init in initializers.values():
        if init.data_type not in _FLOATS or init.name == name:
            continue
        found = _LAYER.search(init.name)
        same_layer = layer is not None and found is not None and found.group(1) == layer.group(1)
        if same_layer or (layer is None and found is None and module and module in init.name):
            yield init


def _slots(initializer: str, stored: np.ndarray, expected: np.ndarray) -> list[Slot]:
    """Each slot of `stored` (whole, a column slice transposed, or a row slice) that equals `expected`."""
    want = expected.astype(stored.dtype)
    if stored.ndim != want.ndim or stored.ndim not in (1, 2):
        return []
    if stored.ndim == 1:
        return [Slot(initializer, False, s) for s in _starts(stored, want)]
    found = [Slot(initializer, False, s) for s in _row_starts(stored, want)]
    if stored.shape[0] == want.shape[1] and stored.shape[1] >= want.shape[0]:
        found += [Slot(initializer, True, s) for s in _row_starts(stored.T, want)]
    return found


def _starts(stored: np.ndarray, want: np.ndarray) -> list[int]:
    """Offsets where the 1-D `want` lies in the 1-D `stored`."""
    n = want.shape[0]
    return [s for s in range(stored.shape[0] - n + 1) if np.array_equal(stored[s : s + n], want)]


def _row_starts(stored: np.ndarray, want: np.ndarray) -> list[int]:
    """Offsets of the rows where the 2-D `want` lies in the 2-D `stored` (same width)."""
    if stored.shape[1] != want.shape[1] or stored.shape[0] < want.shape[0]:
        return []
    columns = min(_PROBE_ROWS, want.shape[1])
    first = np.nonzero(np.all(stored[:, :columns] == want[0, :columns], axis=1))[0]
    rows = want.shape[0]
    fits = [int(s) for s in first if s + rows <= stored.shape[0]]
    return [s for s in fits if np.array_equal(stored[s : s + rows], want)]


def _write(array: np.ndarray, slot: Slot, merged: np.ndarray) -> None:
    """Write the merged tensor into its slot of the initializer's copy."""
    if array.ndim == 1:
        array[slot.start : slot.start + merged.shape[0]] = merged
    elif slot.transposed:
        array[:, slot.start : slot.start + merged.shape[0]] = merged.T
    else:
        array[slot.start : slot.start + merged.shape[0]] = merged
