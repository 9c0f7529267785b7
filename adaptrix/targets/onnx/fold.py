"""A written graph without dead nodes, Identity hops or Constant nodes.

optimum's export reads deduplicated weights through Identity nodes and spells every literal as a
Constant node; the attention and norm fusions leave nodes no output depends on. This pass drops
what no graph output needs, points the readers of an Identity at its input, and turns each
Constant (a `value` tensor) into an initializer of the same name: no node is left that only
forwards or holds a value. Runs last before quantization, once every patch has found its
initializer by the node that reads it (the patch tells a deduplicated weight's users apart by
their Identity nodes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

__all__ = ["FoldReport", "fold_graph"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FoldReport:
    """Nodes removed by kind: dead (no output needs them), Identity, Constant (now initializers)."""

    dead: int
    identities: int
    constants: int
    declined: str | None = None


def fold_graph(model: onnx.ModelProto) -> FoldReport:
    """Fold the graph in place; returns what was removed."""
    graph = model.graph
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in subgraphs for node in graph.node for a in node.attribute):
        return FoldReport(
            0, 0, 0, "the graph has subgraphs (If / Loop), whose outer names this pass does not follow"
        )
    dead = _prune(graph)
    identities = _skip_identities(graph)
    constants = _constants_to_initializers(graph)
    report = FoldReport(dead, identities, constants)
    logger.info("folded the graph: %d dead nodes, %d Identity, %d Constant", dead, identities, constants)
    return report


def _prune(graph: onnx.GraphProto) -> int:
    """Drop nodes that no graph output depends on, and initializers nothing reads; return the nodes."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed = {value.name for value in graph.output}
    todo, live = list(needed), set()
    while todo:  # by producers, not by position: a converted graph need not list nodes in order
        position = producer.get(todo.pop())
        if position is not None and position not in live:
            live.add(position)
            inputs = [name for name in graph.node[position].input if name and name not in needed]
            needed.update(inputs)
            todo.extend(inputs)
    kept = [node for i, node in enumerate(graph.node) if i in live]
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    inputs = {value.name for value in graph.input}  # an overridable initializer stays with its input
    initializers = [init for init in graph.initializer if init.name in needed or init.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return removed


def _skip_identities(graph: onnx.GraphProto) -> int:
    """Readers of an Identity read its input instead.

    An Identity stays where it makes a graph output, or where its output's name is also an
    initializer's or an input's: that graph is malformed, and onnxruntime's load check must see it.
    """
    keep = {value.name for value in (*graph.output, *graph.input)} | {init.name for init in graph.initializer}
    source: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in keep:
            source[node.output[0]] = source.get(node.input[0], node.input[0])
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in source:
            continue
        for i, name in enumerate(node.input):
            node.input[i] = source.get(name, name)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return len(source)


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Each Constant holding a `value` tensor (not a graph output) becomes an initializer of its name."""
    outputs = {value.name for value in graph.output}
    kept, moved = [], []
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if (
            attr is None
            or attr.name != "value"
            or node.output[0] in outputs
            or node.domain not in ("", "ai.onnx")
        ):
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = node.output[0]
        moved.append(tensor)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(moved)
    return len(moved)
