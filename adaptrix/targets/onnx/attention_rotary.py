"""The packed q/k/v handed to GroupQueryAttention, which rotates q and k itself, as the builder does.

After pack.py a layer's attention reads Split(packed) -> RotaryEmbedding(q), RotaryEmbedding(k),
v -> GroupQueryAttention. GroupQueryAttention takes the packed projection and the cos / sin
caches itself, so the Split and both RotaryEmbedding nodes go: three kernel calls per layer and
decode step. Its kernel takes each row's positions from the cache length (seqlens_k), not from
`position_ids`: a left-padded row's tokens are rotated as if its padding were tokens too. Rotary
embeddings are relative (a query and a key rotated by the same extra angle give the same score)
and fuse.py's attention bias masks the padding, so the attention is the same: a left-padded
row's logits equal PEFT's (tests/test_onnx_lean.py). The present keys then hold keys rotated at
those shifted positions; the graph is their only reader.

A layer is rewritten only when the pattern is exactly that: both rotaries over the whole head
(no rotary_embedding_dim), not interleaved, unscaled, sharing the cos / sin caches, a head size
that is a multiple of 16 (the kernel's rotary needs it), and the Split's three outputs read by
them and by the attention alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from adaptrix.targets.onnx.graph import GraphIndex

__all__ = ["RotaryReport", "rotary_in_attention"]


@dataclass(frozen=True, slots=True)
class RotaryReport:
    """How many layers now rotate inside GroupQueryAttention, and why the others did not."""

    fused: int
    declined: dict[str, str]


def rotary_in_attention(model: onnx.ModelProto) -> RotaryReport:
    """Rewrite each layer's Split + 2 RotaryEmbedding + GroupQueryAttention; return what was done."""
    graph = model.graph
    g = GraphIndex(graph)
    dropped: set[int] = set()
    fused, declined = 0, {}
    for gqa in [node for node in graph.node if node.op_type == "GroupQueryAttention"]:
        why = _why_not(gqa, g)
        if why is not None:
            declined[gqa.name] = why
            continue
        q_rot, k_rot = g.producer[gqa.input[0]], g.producer[gqa.input[1]]
        split = g.producer[q_rot.input[0]]
        inputs = list(gqa.input) + [""] * (11 - len(gqa.input))
        inputs[0:3] = [split.input[0], "", ""]
        inputs[7:9] = [q_rot.input[2], q_rot.input[3]]
        del gqa.input[:]
        gqa.input.extend(inputs)
        for attribute in gqa.attribute:
            if attribute.name == "do_rotary":
                attribute.i = 1
        if not any(a.name == "do_rotary" for a in gqa.attribute):
            gqa.attribute.append(helper.make_attribute("do_rotary", 1))
        dropped.update({id(split), id(q_rot), id(k_rot)})
        fused += 1
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return RotaryReport(fused, declined)


def _why_not(gqa: onnx.NodeProto, g: GraphIndex) -> str | None:
    """Why a layer's attention keeps its own RotaryEmbedding nodes (None: it can take them in)."""
    if len(gqa.input) < 3 or any(name for name in gqa.input[7:9]):
        return "not fuse.py's attention (no q/k/v inputs, or its own rotary caches)"
    q_rot, k_rot, v = g.producer.get(gqa.input[0]), g.producer.get(gqa.input[1]), gqa.input[2]
    if q_rot is None or k_rot is None or q_rot.op_type != k_rot.op_type or q_rot.op_type != "RotaryEmbedding":
        return "q and k are not RotaryEmbedding outputs"
    split = g.producer.get(q_rot.input[0])
    if split is None or split.op_type != "Split" or list(split.output) != [q_rot.input[0], k_rot.input[0], v]:
        return "q, k and v are not one packed projection's Split (pack.py declined this layer)"
    if q_rot.input[1:4] != k_rot.input[1:4]:
        return "q and k rotate with different positions or caches"
    for rotary in (q_rot, k_rot):
        attributes = {a.name: helper.get_attribute_value(a) for a in rotary.attribute}
        if attributes.get("interleaved", 0) or attributes.get("rotary_embedding_dim", 0):
            return "an interleaved or partial rotary"
        if attributes.get("scale", 1.0) != 1.0 or attributes.get("is_packed_batching", 0):
            return "a scaled or packed-batching rotary"
    heads = {a.name: a.i for a in gqa.attribute}.get("num_heads", 0)
    sizes = g.constant(split.input[1])
    if not heads or sizes is None or (int(sizes[0]) // heads) % 16:
        return "a head size that is not a multiple of 16 (the kernel's rotary takes no other)"
    for name in (*split.output, q_rot.output[0], k_rot.output[0]):
        if name in g.outputs or len(g.readers.get(name, [])) != 1:
            return f"{name} is read elsewhere"
    return None
