"""RMSNorms of a float32 decoder graph fused into onnxruntime's (Skip)SimplifiedLayerNormalization.

optimum spells each RMSNorm out in thirteen nodes: Cast, Pow, ReduceMean, Add eps, Sqrt, Div,
Mul, Cast, Mul weight and four Constants, each one kernel call per decode step. This pass writes
one SimplifiedLayerNormalization per norm, and where the norm reads a residual Add of two
activations, one SkipSimplifiedLayerNormalization that also returns the sum (the residual stream
the next Add reads), as onnxruntime-genai's model builder does. A norm whose nodes do not match
the pattern exactly (Gemma's (1 + weight), a value read elsewhere) is left as it is, and the report
counts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from adaptrix.targets.onnx.graph import GraphIndex

__all__ = ["NormReport", "fuse_norms"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NormReport:
    """Norms fused (and how many of them took their residual Add), or why none was."""

    fused: int
    skip: int
    declined: str | None = None


@dataclass(frozen=True, slots=True)
class _Norm:
    """One RMSNorm found in the graph: its input, weight, epsilon, output and the nodes it replaces."""

    x: str  # the hidden states before the exporter's float32 Cast
    cast: str | None  # that Cast's output (other readers get `x` instead), or None
    weight: str
    epsilon: float
    output: str
    nodes: tuple[int, ...]  # positions in graph.node, the first being where the norm is written


def fuse_norms(model: onnx.ModelProto) -> NormReport:
    """Fuse every recognised RMSNorm of a float32 graph in place; returns what was done."""
    graph = model.graph
    past = [value for value in graph.input if value.name.startswith("past_key_values.")]
    if not past or any(value.type.tensor_type.elem_type != TensorProto.FLOAT for value in past):
        return NormReport(0, 0, "not a float32 decoder graph with a KV cache")
    g = GraphIndex(graph)
    positions = {id(node): i for i, node in enumerate(graph.node)}
    norms = [n for node in graph.node if node.op_type == "Pow" and (n := _match(node, g, positions))]
    if not norms:
        return NormReport(0, 0, "no Pow-ReduceMean-Sqrt-Div-Mul RMSNorm pattern in the graph")
    skip = _rewrite(graph, norms, g)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    logger.info("fused %d RMSNorms (%d with their residual Add)", len(norms), skip)
    return NormReport(len(norms), skip)


def _match(pow_: onnx.NodeProto, g: GraphIndex, positions: dict) -> _Norm | None:
    """The RMSNorm starting at a Pow(x, 2), or None where any node differs from the pattern."""
    xc = pow_.input[0]
    if g.scalar(pow_.input[1]) != 2.0:
        return None
    chain = [pow_]
    for op in ("ReduceMean", "Add", "Sqrt", "Div", "Mul"):
        node = _only_reader(chain[-1].output[0], g, op)
        if node is None:
            return None
        chain.append(node)
    mean, add, _, div, mul = chain[1:]
    if not _last_axis(mean, g) or div.input[1] != chain[3].output[0] or g.scalar(div.input[0]) != 1.0:
        return None
    epsilon = g.scalar(add.input[1])
    if epsilon is None or xc not in mul.input:
        return None
    tail = _only_reader(mul.output[0], g, "Cast")
    if tail is not None and _cast_to(tail) != TensorProto.FLOAT:
        return None
    last = _only_reader((tail or mul).output[0], g, "Mul")
    if last is None:
        return None
    weight = last.input[0] if last.input[1] == (tail or mul).output[0] else last.input[1]
    init = g.weight(weight)
    if init is None or len(init.dims) != 1:
        return None
    head = g.made(xc, "Cast")
    float_cast = head is not None and _cast_to(head) == TensorProto.FLOAT and xc not in g.outputs
    cast = head if float_cast else None
    nodes = [*chain, *([tail] if tail else []), last]
    return _Norm(cast.input[0] if cast else xc, xc if cast else None, weight, epsilon, last.output[0],
                 tuple(positions[id(node)] for node in ([cast] if cast else []) + nodes))  # fmt: skip


def _only_reader(name: str, g: GraphIndex, op: str) -> onnx.NodeProto | None:
    readers = g.readers.get(name, [])
    if len(readers) != 1 or readers[0].op_type != op or name in g.outputs:
        return None
    return readers[0]


def _last_axis(mean: onnx.NodeProto, g: GraphIndex) -> bool:
    """ReduceMean over the last axis only, keeping it (axes as input or attribute)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
    if attrs.get("keepdims", 1) != 1:
        return False
    axes = attrs.get("axes")
    if axes is None and len(mean.input) > 1:
        value = g.constant(mean.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return axes is not None and list(axes) == [-1]


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _rewrite(graph: onnx.GraphProto, norms: list[_Norm], g: GraphIndex) -> int:
    """Replace each norm's nodes by one fused node; take in the residual Add where one feeds it."""
    rename = {norm.cast: norm.x for norm in norms if norm.cast}  # a float32 Cast of float32: a no-op
    positions = {id(node): i for i, node in enumerate(graph.node)}
    removed, placed, skip = set(), {}, 0
    for norm in norms:
        removed.update(norm.nodes)
        module = graph.node[norm.nodes[-1]].name.rpartition("/")[0]
        attrs = {"axis": -1, "epsilon": norm.epsilon, "stash_type": 1}
        add = g.made(norm.x, "Add")
        residual = add is not None and positions[id(add)] not in removed
        if residual and all(g.tensor(name) is None and name for name in add.input):
            node = helper.make_node(
                "SkipSimplifiedLayerNormalization", [*add.input, norm.weight], [norm.output, "", "", norm.x],
                name=f"{module}/SkipSimplifiedLayerNormalization", domain="com.microsoft",
                epsilon=norm.epsilon,
            )  # fmt: skip
            at = positions[id(add)]
            removed.add(at)
            skip += 1
        else:
            node = helper.make_node("SimplifiedLayerNormalization", [norm.x, norm.weight], [norm.output],
                                    name=f"{module}/SimplifiedLayerNormalization", **attrs)  # fmt: skip
            at = norm.nodes[0]
        placed[at] = node
    kept = []
    for position, node in enumerate(graph.node):
        if position in placed:
            kept.append(placed[position])
        if position not in removed:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return skip
