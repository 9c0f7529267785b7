"""Merged expert weights written into the rows of transformers 5's packed expert initializers.

transformers 5 loads each stored expert weight (Mixtral's `block_sparse_moe.experts.3.w1`) into
rows of a 3-D parameter (`mlp.experts.gate_up_proj` [E, 2I, H]); the dense torch.onnx export
(torch_export.dense_packed_experts_forward) keeps that parameter whole as the first input of a
MatMul, an initializer named after it. Each touched expert weight's merged value replaces its
rows there, after a probe of those rows is compared with the checkpoint's tensor. Anything else
(the parameter folded, transposed or read elsewhere) is refused in one line naming the module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from adaptrix.artifacts import probe_indices
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.safetensors_io import read_elements
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.lowering.tensor_plan import TensorPlan, merged_value
from adaptrix.targets.onnx.external import read_initializer

__all__ = ["is_packed_expert", "patch_packed_expert", "router_tensor_names"]


def is_packed_expert(item: TensorPlan) -> bool:
    """Whether `item` is one expert's stored weight that the loaded model keeps in packed rows."""
    packed = item.placement.module.packed if item.placement is not None else None
    return packed is not None and packed.expert is not None and item.param == "weight"


def router_tensor_names(base: Checkpoint) -> dict[str, str]:
    """{loaded name of a renamed router weight (`layers.0.mlp.gate.weight`): the stored one}."""
    found = {}
    for name in base.tensors:
        module, _, param = name.rpartition(".")
        placement = base.binder.resolve(module)
        packed = placement.module.packed if placement is not None else None
        if packed is None or packed.expert is not None or placement.layer is None:
            continue
        container = base.binder.layer_container
        found[f"{container}.{placement.layer}.{packed.module}.{param}"] = name
    return found


def patch_packed_expert(
    item: TensorPlan, base: Checkpoint, graph: onnx.GraphProto, folder: Path, values: dict
) -> None:
    """Write `item`'s merged value into its rows of the packed initializer (kept in `values`)."""
    packed = item.placement.module.packed
    suffix = f"{base.binder.layer_container}.{item.placement.layer}.{packed.module}.{packed.param}"
    init = _packed_initializer(graph, suffix, item, base)
    if init.name not in values:
        values[init.name] = np.array(read_initializer(init, folder))  # a writable copy
    array = values[init.name]
    first, last = packed.rows
    rows = array[packed.expert, first:last]
    info = base.tensors[item.source]
    if tuple(rows.shape) != tuple(info.shape):
        raise BadInputError(
            f"{item.name}: rows {first}..{last} of expert {packed.expert} of the graph's initializer "
            f"{init.name} have shape {list(rows.shape)}, the base's tensor {list(info.shape)}",
            path=folder,
            fix="clear the ONNX cache directory and compile again",
        )
    indices = probe_indices(math.prod(info.shape))
    expected = read_elements(info, indices).to(torch.float64).numpy()
    got = np.asarray(rows[np.unravel_index(indices, info.shape)], dtype=np.float64)
    if not np.allclose(got, expected, rtol=2e-3, atol=1e-6):
        raise BadInputError(
            f"{item.name}: the graph's initializer {init.name} does not hold the base's values in rows "
            f"{first}..{last} of expert {packed.expert}",
            path=folder,
            fix="clear the ONNX cache directory and compile again",
        )
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    array[packed.expert, first:last] = merged_value(item, base, torch.float32).numpy().astype(dtype)


def _packed_initializer(graph: onnx.GraphProto, suffix: str, item: TensorPlan, base: Checkpoint):
    """The initializer named after the packed parameter, read only as a MatMul's first input."""
    found = [init for init in graph.initializer if init.name == suffix or init.name.endswith("." + suffix)]
    readers = [(node, list(node.input).index(found[0].name)) for node in graph.node
               if found and found[0].name in node.input]  # fmt: skip
    if len(found) != 1 or len(readers) != 1 or readers[0][0].op_type != "MatMul" or readers[0][1] != 0:
        raise UnsupportedError(
            f"module {item.name.removesuffix('.weight')}: the exported {base.config.get('model_type')} "
            f"ONNX graph does not read the packed parameter {suffix} as one MatMul's weight, so the "
            "adapter cannot be merged into its rows",
            path=base.path,
            fix="use --target merged or hooks for this model",
        )
    return found[0]
