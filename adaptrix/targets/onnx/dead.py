"""Whether a changed module is absent from the exported graphs, or there where the patcher cannot see.

The exporter traces one call signature: a decoder-only BART never runs its cross-attention, a
masked-LM graph never runs the pooler. A LoRA on such a module cannot change what the graph
computes, so there is nothing to patch. But a weight the exporter folded (transposed, renamed
`onnx::MatMul_12`) is present under another name, and skipping it would leave the base's value
in the graph. Absent means both: no node is named after the module, and no initializer of any
graph holds the module's weight (in either layout). Anything else is refused by the caller.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from adaptrix.artifacts import probe_indices
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.targets.onnx.external import read_initializer

__all__ = ["absent_from_graphs"]

logger = logging.getLogger(__name__)


def absent_from_graphs(
    name: str, source: str, base: Checkpoint, graphs: list[onnx.ModelProto], folder: Path
) -> bool:
    """Whether tensor `name` (stored as the base's `source`) is used by no node and held by no initializer."""
    module = name.rpartition(".")[0].split(".")
    paths = {"/" + "/".join(module[start:]) + "/" for start in range(min(2, len(module)))}
    for model in graphs:
        if any(path in node.name for node in model.graph.node for path in paths):
            return False
    weight = base.read(source).float().numpy()
    probes = probe_indices(weight.size)
    layouts = [weight, weight.T] if weight.ndim == 2 else [weight]  # as stored, or transposed
    expected = [(layout.shape, np.ascontiguousarray(layout).reshape(-1)[probes]) for layout in layouts]
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for model in graphs:
        for init in model.graph.initializer:
            dims = tuple(init.dims)
            if init.data_type not in floats or not any(dims == shape for shape, _ in expected):
                continue
            value = np.asarray(read_initializer(init, folder), dtype=np.float32).reshape(-1)[probes]
            if any(
                dims == shape and np.allclose(value, want, rtol=1e-3, atol=1e-6) for shape, want in expected
            ):
                return False
    logger.warning("%s: no node of the exported graph runs it and no initializer holds it: the graph "
                   "never uses the module, whose delta cannot change its outputs", name)  # fmt: skip
    return True
