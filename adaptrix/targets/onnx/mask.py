"""The fused attention's mask computed in ten nodes instead of optimum's forty-odd.

After fuse.py, GroupQueryAttention's attention bias is Where(mask, 0, min) over optimum's boolean
[batch, 1, query, key] mask, which the export spells out in about 45 shape nodes (ConstantOfShape,
Range, Reshape, Expand, Gather, Unsqueeze, ...), each one kernel call per decode step. The same
mask is key <= past + query (causal) and attention_mask[key] (padding): this pass computes that
from the graph's inputs and leaves optimum's nodes to fold.py, which drops them as dead. A graph
without fuse.py's bias node is left unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MaskReport", "compact_mask"]

logger = logging.getLogger(__name__)

_BIAS = "adaptrix/attention/bias"  # fuse.py's Where(mask, 0, min)
_P = "adaptrix/mask"


@dataclass(frozen=True, slots=True)
class MaskReport:
    """Whether the mask was rewritten, or why not."""

    replaced: bool
    declined: str | None = None


def compact_mask(model: onnx.ModelProto) -> MaskReport:
    """Point the fused attention's bias at a compact causal + padding mask; returns what was done."""
    graph = model.graph
    where = next((node for node in graph.node if node.name == _BIAS and node.op_type == "Where"), None)
    if where is None:
        return MaskReport(False, "no fused attention bias (adaptrix/attention/bias) in the graph")
    if not {"input_ids", "attention_mask"} <= {value.name for value in graph.input}:
        return MaskReport(False, "the graph does not take input_ids and attention_mask")
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0, dtype=np.int64), f"{_P}/zero"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), f"{_P}/one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{_P}/axis1"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), f"{_P}/axes12"),
    ])  # fmt: skip
    nodes = [
        _node("Shape", ["input_ids"], "query", start=1, end=2),
        _node("Shape", ["attention_mask"], "total", start=1, end=2),
        _node("Sub", [f"{_P}/total", f"{_P}/query"], "past"),
        _node("Squeeze", [f"{_P}/total"], "total_scalar"),
        _node("Squeeze", [f"{_P}/past"], "past_scalar"),
        _node("Range", [f"{_P}/zero", f"{_P}/total_scalar", f"{_P}/one"], "keys"),
        _node("Range", [f"{_P}/past_scalar", f"{_P}/total_scalar", f"{_P}/one"], "queries"),
        _node("Unsqueeze", [f"{_P}/queries", f"{_P}/axis1"], "query_column"),
        _node("LessOrEqual", [f"{_P}/keys", f"{_P}/query_column"], "causal"),
        _node("Cast", ["attention_mask"], "padding", to=TensorProto.BOOL),
        _node("Unsqueeze", [f"{_P}/padding", f"{_P}/axes12"], "padding_4d"),
        _node("And", [f"{_P}/causal", f"{_P}/padding_4d"], "mask"),
    ]
    where.input[0] = f"{_P}/mask"
    ordered = []
    for node in graph.node:
        if node is where:
            ordered.extend(nodes)
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    logger.info("the fused attention's mask: %d nodes from the graph's inputs", len(nodes))
    return MaskReport(True)


def _node(op: str, inputs: list[str], name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [f"{_P}/{name}"], name=f"{_P}/{name}", **attrs)
