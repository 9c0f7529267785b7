"""--unmerged: LoRA pairs as overridable graph inputs, and one `.onnx_adapter` file per adapter.

Each touched module's MatMul (or Gemm) gets a side branch, y = base(x) + (x @ A) @ B, where A
[in, rank] and B [rank, out] are graph inputs named `<module>.lora_A` / `.lora_B` with a dynamic
rank, backed by zero-rank initializers of the same names: with no adapter active the branch adds
nothing. An adapter file sets A = down and B = up (every scale folded into B) for the modules it
touches, and the IA3 vectors of `ia3.py` beside them; onnxruntime activates it with
`RunOptions.add_active_adapter`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from adaptrix.artifacts import ADAPTER_SUFFIX, ADAPTERS_DIR
from adaptrix.ir.errors import UnsupportedError
from adaptrix.lowering.module_pairs import LowRankPair
from adaptrix.targets.onnx.graph import Use, insert_after

__all__ = [
    "ADAPTERS_DIR",
    "ADAPTER_SUFFIX",
    "LoraBranch",
    "add_lora_inputs",
    "initializer_dtype",
    "model_version",
    "module_matmul",
    "write_adapter_files",
]


@dataclass(frozen=True, slots=True)
class LoraBranch:
    """The graph inputs of one module's LoRA branch and the nodes that compute it."""

    module: str
    a: str
    b: str
    in_features: int
    out_features: int
    dtype: np.dtype  # the dtype of the module's weight: an fp16 graph keeps some MatMuls in fp32
    nodes: tuple[str, ...]


def model_version(base_key: str) -> int:
    """The model version written into adapter files: 31 bits of the base export's key."""
    return int(base_key[:8], 16) & 0x7FFFFFFF


def add_lora_inputs(
    model: onnx.ModelProto, uses: dict[str, list[Use]], modules: Sequence[LowRankPair]
) -> list[LoraBranch]:
    """Give each module's MatMul / Gemm a LoRA branch with overridable, zero-rank inputs."""
    graph = model.graph
    after: dict[int, list[onnx.NodeProto]] = {}
    branches = []
    for pair in modules:
        name = pair.placement.name
        use = module_matmul(graph, uses, name, pair.weight)
        node = graph.node[use.node]
        dtype = initializer_dtype(graph, use.initializer)
        in_features, out_features = pair.down.shape[0], pair.up.shape[1]
        a, b, rank = f"{name}.lora_A", f"{name}.lora_B", f"{name}.lora_rank"
        graph.input.extend([helper.make_tensor_value_info(a, dtype, [in_features, rank]),
                            helper.make_tensor_value_info(b, dtype, [rank, out_features])])  # fmt: skip
        graph.initializer.extend([helper.make_tensor(a, dtype, [in_features, 0], []),
                                  helper.make_tensor(b, dtype, [0, out_features], [])])  # fmt: skip
        output = node.output[0]
        node.output[0] = f"{output}/adaptrix_base"
        prefix = node.name.rpartition("/")[0] + "/lora"
        nodes = [
            helper.make_node("MatMul", [node.input[0], a], [f"{prefix}/down"], name=f"{prefix}/MatMul_A"),
            helper.make_node("MatMul", [f"{prefix}/down", b], [f"{prefix}/up"], name=f"{prefix}/MatMul_B"),
            helper.make_node("Add", [node.output[0], f"{prefix}/up"], [output], name=f"{prefix}/Add"),
        ]
        after[use.node] = nodes
        names = tuple(n.name for n in nodes[:2])
        np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
        branches.append(LoraBranch(name, a, b, in_features, out_features, np_dtype, names))
    insert_after(graph, after)
    return branches


def module_matmul(graph: onnx.GraphProto, uses: dict[str, list[Use]], name: str, weight: str) -> Use:
    """The use of a module's weight by its MatMul / Gemm (one that takes its input as is)."""
    use = next((u for u in uses.get(weight, ()) if u.index == 1
                and graph.node[u.node].op_type in ("MatMul", "Gemm")), None)  # fmt: skip
    if use is None:
        raise UnsupportedError(f"module {name}: no MatMul of the exported ONNX graph reads {weight}",
                               fix="compile without --unmerged, or use --target hooks")  # fmt: skip
    if any(a.name == "transA" and a.i for a in graph.node[use.node].attribute):
        raise UnsupportedError(f"{name}: its Gemm transposes its input", fix="compile without --unmerged")
    return use


def initializer_dtype(graph: onnx.GraphProto, name: str) -> int:
    """The ONNX data type of an initializer."""
    return next(init.data_type for init in graph.initializer if init.name == name)


def write_adapter_files(
    adapters: Sequence[tuple[str, list[LowRankPair]]],
    branches: Sequence[LoraBranch],
    out: Path,
    version: int,
    vectors: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, dict]:
    """One `.onnx_adapter` per adapter (its pairs and IA3 `vectors[name]`); returns the manifest's entries."""
    by_module = {branch.module: branch for branch in branches}
    folder = out / ADAPTERS_DIR
    folder.mkdir()
    entries = {}
    for name, pairs in adapters:
        params = {}
        for pair in pairs:
            branch = by_module[pair.placement.name]
            for key, value in ((branch.a, pair.down), (branch.b, pair.up)):
                array = np.ascontiguousarray(value.to(torch.float32).numpy().astype(branch.dtype))
                params[key] = ort.OrtValue.ortvalue_from_numpy(array)
        scales = (vectors or {}).get(name, {})
        params.update({key: ort.OrtValue.ortvalue_from_numpy(array) for key, array in scales.items()})
        file = folder / f"{name}{ADAPTER_SUFFIX}"
        writer = ort.AdapterFormat()
        writer.set_adapter_version(1)
        writer.set_model_version(version)
        writer.set_parameters(params)
        writer.export_adapter(str(file))
        entries[name] = {
            "file": f"{ADAPTERS_DIR}/{file.name}",
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
            "ranks": {pair.placement.name: int(pair.down.shape[1]) for pair in pairs},
            **({"scales": sorted(scales)} if scales else {}),
        }
    return entries
