"""Each layer's q, k and v projections packed into one MatMul, as onnxruntime-genai's builder packs them.

Three MatMuls reading the same normed hidden states become one MatMul over the weights
concatenated along the output ([in, q + k + v]) and a Split back into the three outputs, so a
quantized graph runs one MatMulNBits per layer where it ran three (the blocks run along the
input, so the packed weight quantizes to the same bytes as the three).

attention_rotary.py then hands the packed projection to GroupQueryAttention where it can.

Runs after the patches and the LoRA / IA3 / bottleneck nodes are in: a merged weight is read
where the patch left it (`values`). A layer is packed only where it is safe, and the report says
why each other layer was not: a weight that is a graph input or shared with another node, an IA3
input scale (q, k and v then read different inputs), a projection with a bias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptrix.targets.onnx.external import read_initializer, value_array
from adaptrix.targets.onnx.graph import GraphIndex, initializer_users

__all__ = ["PackReport", "pack_qkv"]

logger = logging.getLogger(__name__)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True, slots=True)
class PackReport:
    """Layers packed, why the others were not, and the weights each packed weight holds."""

    packed: int
    declined: dict[str, str] = field(default_factory=dict)  # layer prefix -> reason
    weights: dict[str, tuple[str, ...]] = field(default_factory=dict)  # packed weight -> q, k, v weights


def pack_qkv(model: onnx.ModelProto, values: dict, folder: Path) -> PackReport:
    """Pack each layer's q/k/v MatMuls in place; the packed weights' values go into `values`."""
    graph = model.graph
    g = GraphIndex(graph)
    users = initializer_users(graph)
    overridable = {value.name for value in graph.input}
    declined, weights = {}, {}
    layer = 0
    while f"/model/layers.{layer}/self_attn/q_proj/MatMul" in (by_name := {n.name: n for n in graph.node}):
        prefix = f"/model/layers.{layer}/self_attn"
        nodes = [by_name.get(f"{prefix}/{p}/MatMul") for p in _PROJECTIONS]
        why = _why_not(nodes, g, users, overridable)
        layer += 1
        if why is not None:
            declined[prefix] = why
            continue
        inits = [g.weight(node.input[1]) for node in nodes]
        name = f"{prefix.strip('/').replace('/', '.')}.qkv_proj.packed_weight"
        widths = [int(init.dims[1]) for init in inits]
        dims = [int(inits[0].dims[0]), sum(widths)]
        graph.initializer.append(onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims))
        values[name] = _concatenated(inits, values, folder)
        weights[name] = tuple(init.name for init in inits)
        _rewrite(graph, nodes, name, widths, prefix)
        g = GraphIndex(graph)
    if weights:
        _drop_unread(graph, {w for packed in weights.values() for w in packed})
    if not weights and not declined:
        declined["graph"] = "no /model/layers.N/self_attn/q_proj/MatMul nodes"
    logger.info("packed q/k/v in %d layers; not packed: %s", len(weights), declined or "none")
    return PackReport(len(weights), declined, weights)


def _why_not(nodes, g: GraphIndex, users: dict, overridable: set[str]) -> str | None:
    """Why a layer's q/k/v MatMuls cannot be packed, or None."""
    if any(node is None or node.op_type != "MatMul" for node in nodes):
        return "q_proj / k_proj / v_proj are not all MatMul nodes"
    if len({node.input[0] for node in nodes}) != 1:
        return "q, k and v read different inputs (an IA3 input scale, or a bottleneck)"
    inits = [g.weight(node.input[1]) for node in nodes]
    if any(init is None or node.input[1] in overridable for init, node in zip(inits, nodes, strict=True)):
        return "a weight is not a constant initializer"
    if any(init.data_type != TensorProto.FLOAT or len(init.dims) != 2 for init in inits):
        return "a weight is not a 2-D float32 matrix"
    if len({init.dims[0] for init in inits}) != 1 or any(users.get(init.name) != 1 for init in inits):
        return "a weight is shared with another node"
    return None


def _concatenated(inits, values: dict, folder: Path) -> Callable[[], np.ndarray]:
    """A write_model value: the three weights (patched or the export's) side by side, made when written."""
    sources = [(init, values.get(init.name)) for init in inits]

    def make() -> np.ndarray:
        parts = [read_initializer(init, folder) if source is None else value_array(source, init)
                 for init, source in sources]  # fmt: skip
        return np.ascontiguousarray(np.concatenate([np.asarray(p, np.float32) for p in parts], axis=1))

    return make


def _rewrite(graph, nodes, weight: str, widths: list[int], prefix: str) -> None:
    """One MatMul and a Split back into the three projections' outputs, where the q MatMul was."""
    stem = f"{prefix}/qkv_proj"
    packed = f"{stem}/MatMul_output_0"
    matmul = helper.make_node("MatMul", [nodes[0].input[0], weight], [packed], name=f"{stem}/MatMul")
    sizes = f"{stem}/split_sizes"
    graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), sizes))
    outputs = [node.output[0] for node in nodes]
    split = helper.make_node("Split", [packed, sizes], outputs, name=f"{stem}/Split", axis=-1)
    dropped, ordered = {id(node) for node in nodes}, []
    for node in graph.node:
        if node is nodes[0]:
            ordered.extend([matmul, split])
        if id(node) not in dropped:
            ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_unread(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the initializers in `candidates` (and Identity nodes over them) that nothing reads."""
    read = {name for node in graph.node if node.op_type != "Identity" for name in node.input}
    read |= {value.name for value in graph.output}
    kept_nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.input[0] in candidates
                                                  and n.output[0] not in read)]  # fmt: skip
    del graph.node[:]
    graph.node.extend(kept_nodes)
    read |= {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name not in candidates or init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
