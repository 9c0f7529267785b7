"""Each layer's attention in a Llama-family decoder graph fused into onnxruntime's GroupQueryAttention.

optimum's export spells attention out in about 100 nodes per layer (shape arithmetic, rotary
halves, repeat_kv, the masked softmax), each one kernel call in onnxruntime: 6-8 ms of a 55 ms
int4 decode step of a 1.1B model on 2 cores. This pass puts RotaryEmbedding on q and k and one
GroupQueryAttention in their place and keeps the graph's contract: the same inputs and outputs,
rotary positions read from position_ids, and the graph's own causal + padding mask passed as
attention_bias, so a left-padded batch gets the logits the unfused graph gives. A graph it does not
recognise is left unchanged and the report says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.targets.onnx.graph import GraphIndex

__all__ = ["FuseReport", "fuse_attention"]

logger = logging.getLogger(__name__)

_MODEL_TYPES = ("llama", "mistral", "qwen2")  # q/k/v/o projections, full rotary, no q/k norms
_PREFIX = "adaptrix/attention"


@dataclass(frozen=True, slots=True)
class FuseReport:
    """Layers fused, or why none was; `values` holds the new initializers (the rotary caches)."""

    layers: int
    declined: str | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Layer:
    """The tensors one layer's attention reads and writes, found in the unfused graph."""

    q: str
    k: str
    v: str
    output_reader: onnx.NodeProto  # o_proj's MatMul, which reads the attention output
    mask: str  # the boolean [batch, 1, query, key] mask the layer's softmax honours


def fuse_attention(model: onnx.ModelProto, base: Checkpoint) -> FuseReport:
    """Fuse every layer's attention in place; returns what was done, or why nothing was."""
    config = base.config
    if config.get("model_type") not in _MODEL_TYPES:
        return FuseReport(
            0, f"model_type {config.get('model_type')!r} is not one of {', '.join(_MODEL_TYPES)}"
        )
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        return FuseReport(0, "partial rotary embeddings")
    graph = model.graph
    if not {"attention_mask", "position_ids"} <= {value.name for value in graph.input}:
        return FuseReport(0, "the graph does not take attention_mask and position_ids")
    past = [value for value in graph.input if value.name.startswith("past_key_values.")]
    if any(value.type.tensor_type.elem_type != TensorProto.FLOAT for value in past):
        return FuseReport(0, "not a float32 graph (the fused nodes are written for float32)")
    count = sum(1 for value in past if value.name.endswith(".key"))
    layers, why = _find_layers(graph, count)
    if why is not None:
        return FuseReport(0, why)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    caches = rotary_caches(graph, int(config.get("max_position_embeddings") or 0))
    if caches is None or not caches[0].size:
        return FuseReport(
            0, "no /model/rotary_emb inverse frequencies in the graph (or no max_position_embeddings)"
        )
    cos, sin = caches
    _rewrite(graph, layers, heads, kv_heads, list(cos.shape))
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    removed = _prune(graph)
    logger.info("fused attention in %d layers into GroupQueryAttention (%d nodes removed)", count, removed)
    return FuseReport(count, None, {f"{_PREFIX}/cos_cache": cos, f"{_PREFIX}/sin_cache": sin})


def rotary_caches(graph: onnx.GraphProto, positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cos and sin caches [positions, head_dim / 2] the exported rotary embedding computes, or None.

    optimum's graph holds the inverse frequencies (llama3 / linear scaling already applied) as the
    data of /model/rotary_emb/Expand and multiplies Cos and Sin by the attention scaling.
    """
    g = GraphIndex(graph)
    producer = g.producer
    nodes = {node.name: node for node in graph.node}
    expand, cos_mul, sin_mul = (
        nodes.get(f"/model/rotary_emb/{name}") for name in ("Expand", "Mul_1", "Mul_2")
    )
    if expand is None or cos_mul is None or sin_mul is None:
        return None
    inv_freq = g.constant(expand.input[0])
    scales = [_constant(mul.input[1], producer) for mul in (cos_mul, sin_mul)]
    if inv_freq is None or None in scales:
        return None
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32).reshape(1, -1)
    angles = torch.from_numpy(angles)  # torch's cos / sin: the values PyTorch's own forward uses
    return (angles.cos() * scales[0]).numpy(), (angles.sin() * scales[1]).numpy()


def _find_layers(graph: onnx.GraphProto, count: int) -> tuple[list[_Layer], str | None]:
    """Each layer's boundary tensors, or the first reason a layer does not look as expected."""
    nodes = {node.name: node for node in graph.node}
    producer = {out: node for node in graph.node for out in node.output}
    layers = []
    for i in range(count):
        prefix = f"/model/layers.{i}/self_attn/"
        found = {
            m: nodes.get(f"{prefix}{m}_proj/Add") or nodes.get(f"{prefix}{m}_proj/MatMul") for m in "qkvo"
        }
        if any(node is None for node in found.values()):
            return [], f"layer {i}: no q_proj / k_proj / v_proj / o_proj MatMul nodes"
        for kv in ("key", "value"):
            concat = producer.get(f"present.{i}.{kv}")
            if concat is None or concat.op_type != "Concat" or concat.input[0] != f"past_key_values.{i}.{kv}":
                return [], f"layer {i}: present.{i}.{kv} is not past_key_values.{i}.{kv} concatenated"
        mask = _softmax_mask(prefix, graph, producer)
        if mask is None:
            return [], f"layer {i}: its softmax does not add a Where(mask, 0, -inf) bias"
        layers.append(_Layer(found["q"].output[0], found["k"].output[0], found["v"].output[0],
                             nodes[f"{prefix}o_proj/MatMul"], mask))  # fmt: skip
    if len({layer.mask for layer in layers}) > 1:
        return [], "the layers read different attention masks"
    return layers, None


def _softmax_mask(prefix: str, graph: onnx.GraphProto, producer: dict) -> str | None:
    """The boolean mask behind Softmax(MatMul + Where(Slice(mask), 0, -inf)) in one layer."""
    softmax = next((n for n in graph.node if n.op_type == "Softmax" and n.name.startswith(prefix)), None)
    add = producer.get(softmax.input[0]) if softmax is not None else None
    where = producer.get(add.input[1]) if add is not None and add.op_type == "Add" else None
    if where is None or where.op_type != "Where":
        return None
    fill = [_constant(name, producer) for name in where.input[1:]]
    if any(value is None for value in fill) or fill[0] != 0 or fill[1] != -np.inf:
        return None
    sliced = producer.get(where.input[0])
    return sliced.input[0] if sliced is not None and sliced.op_type == "Slice" else where.input[0]


def _constant(name: str, producer: dict) -> float | None:
    node = producer.get(name)
    if node is None or node.op_type != "Constant":
        return None
    value = numpy_helper.to_array(node.attribute[0].t)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _rewrite(
    graph: onnx.GraphProto, layers: list[_Layer], heads: int, kv_heads: int, cache: list[int]
) -> None:
    """Insert the shared inputs of GroupQueryAttention, then per layer RotaryEmbedding x2 + GQA."""
    p = _PREFIX
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{p}/one"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), f"{p}/attend"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, dtype=np.float32), f"{p}/masked"),
    ])  # fmt: skip
    for name in ("cos_cache", "sin_cache"):  # values come with the report
        graph.initializer.append(
            onnx.TensorProto(name=f"{p}/{name}", data_type=TensorProto.FLOAT, dims=cache)
        )
    int32 = TensorProto.INT32
    shared = [
        helper.make_node("Shape", ["attention_mask"], [f"{p}/batch"], start=0, end=1, name=f"{p}/batch"),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/total"], start=1, end=2, name=f"{p}/total"),
        helper.make_node("Sub", [f"{p}/total", f"{p}/one"], [f"{p}/last"], name=f"{p}/last"),
        helper.make_node("Expand", [f"{p}/last", f"{p}/batch"], [f"{p}/seqlens"], name=f"{p}/seqlens"),
        helper.make_node("Cast", [f"{p}/seqlens"], [f"{p}/seqlens_k"], to=int32, name=f"{p}/seqlens_k"),
        helper.make_node("Cast", [f"{p}/total"], [f"{p}/total_len"], to=int32, name=f"{p}/total_len"),
        # A large finite negative, not -inf: a fully masked (left-padding) row must not turn into NaN.
        helper.make_node("Where", [layers[0].mask, f"{p}/attend", f"{p}/masked"], [f"{p}/bias"],
                         name=f"{p}/bias"),
    ]  # fmt: skip
    before: dict[int, list[onnx.NodeProto]] = {}
    for i, layer in enumerate(layers):
        stem = f"/model/layers.{i}/self_attn/fused"
        rotary = {"cos": f"{p}/cos_cache", "sin": f"{p}/sin_cache"}
        q = helper.make_node("RotaryEmbedding", [layer.q, "position_ids", rotary["cos"], rotary["sin"]],
                             [f"{stem}/q_rotary"], name=f"{stem}/q_rotary", domain="com.microsoft",
                             num_heads=heads, interleaved=0)  # fmt: skip
        k = helper.make_node("RotaryEmbedding", [layer.k, "position_ids", rotary["cos"], rotary["sin"]],
                             [f"{stem}/k_rotary"], name=f"{stem}/k_rotary", domain="com.microsoft",
                             num_heads=kv_heads, interleaved=0)  # fmt: skip
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q.output[0], k.output[0], layer.v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             f"{p}/seqlens_k", f"{p}/total_len", "", "", "", f"{p}/bias"],
            [f"{stem}/output", f"present.{i}.key", f"present.{i}.value"],
            name=f"{stem}/GroupQueryAttention", domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=0, local_window_size=-1,
        )  # fmt: skip
        for node in graph.node:  # the unfused producers of present.* lose their outputs
            for j, out in enumerate(node.output):
                if out in (f"present.{i}.key", f"present.{i}.value"):
                    node.output[j] = f"{out}/unfused"
        layer.output_reader.input[0] = gqa.output[0]
        before[id(layer.output_reader)] = [q, k, gqa]
    ordered, mask_done = [], False
    for node in graph.node:
        ordered.extend(before.get(id(node), ()))
        ordered.append(node)
        if not mask_done and layers[0].mask in node.output:
            ordered.extend(shared)
            mask_done = True
    del graph.node[:]
    graph.node.extend(ordered)


def _prune(graph: onnx.GraphProto) -> int:
    """Drop nodes and initializers that no graph output depends on; return the nodes dropped."""
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return removed
