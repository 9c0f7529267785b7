"""float16 graphs that still compute in float32 what the model computes in float32.

onnxruntime's float16 converter turns a float32 export into float16 node by node, and so loses
what PyTorch keeps in float32 whatever the model's dtype (`.to(torch.float32)` ... `.to(dtype)`).
Two rewrites of the float32 graph come first:

- Each RMSNorm (Cast up, Pow 2, ReduceMean, Add eps, Sqrt, 1 / x, Mul, Cast back, Mul weight)
  becomes one SimplifiedLayerNormalization that computes in float32 (stash_type 1) with the
  model's exact epsilon. Converted as it is, onnxruntime 1.31 (today's onnxruntime-gpu) fuses the
  pattern itself but reads a float16 epsilon of 1e-6 as 1e-5: a tiny Llama's logits come out
  9e-3 off PEFT's, on the CPU and the CUDA provider alike (1.32: 2e-4).
- What remains between an upcast and the cast back (the rotary tables: positions times inverse
  frequencies, cos, sin), with the constants it reads, stays in float32 (`islands`): in float16
  the inverse frequencies alone put cos 0.01 off by position 256 and 0.96 off by position 4000.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from adaptrix.targets.onnx.graph import GraphIndex

__all__ = ["fuse_rms_norms", "islands", "to_float16"]

# What an island may hold: arithmetic, never a weight (a weighted op aborts the island).
_ISLAND_OPS = frozenset({
    "Pow", "ReduceMean", "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg",
    "Cos", "Sin", "MatMul", "Concat", "Transpose", "Unsqueeze", "Reshape", "Expand",
})  # fmt: skip
# What feeds an island its constants: followed back through the first input only.
_SOURCE_OPS = frozenset({"Constant", "Cast", "Expand", "Unsqueeze", "Reshape", "Squeeze"})


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (float32, shapes inferred, weights loaded) as float16, inputs and outputs included."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = model.graph
    fuse_rms_norms(graph)
    blocked = set(islands(graph))
    # A value made and read only inside islands loses its type, else the converter takes it for
    # float16 and puts a round trip through float16 on every edge between two float32 nodes.
    inside = {name for node in graph.node if node.name in blocked for name in node.output}
    inside -= {name for node in graph.node if node.name not in blocked for name in node.input}
    kept = [value for value in graph.value_info if value.name not in inside]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True,
                                    node_block_list=sorted(blocked))  # fmt: skip


def _upcast(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)


def _rms_norm(g: GraphIndex, mul: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, str, float] | None:
    """The nodes, input, weight and epsilon of the RMSNorm that `mul` (x * weight) ends, if it is one."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    weights = [n for n in mul.input if (w := g.weight(n)) is not None and len(w.dims) == 1]
    if len(weights) != 1:
        return None
    back = g.producer.get(next(n for n in mul.input if n != weights[0]))
    scaled = g.made(back.input[0], "Mul") if back is not None and _upcast(back) else None
    if scaled is None:
        return None
    for xf, inverse in (scaled.input, reversed(scaled.input)):
        up = g.producer.get(xf)
        if up is None or not _upcast(up):
            continue
        inv = g.producer.get(inverse)
        if inv is not None and inv.op_type == "Div" and g.scalar(inv.input[0]) == 1.0:
            sqrt = g.made(inv.input[1], "Sqrt")
        elif inv is not None and inv.op_type == "Reciprocal":
            sqrt = g.made(inv.input[0], "Sqrt")
        else:
            continue
        add = g.made(sqrt.input[0], "Add") if sqrt is not None else None
        if add is None:
            continue
        eps_at = [i for i, n in enumerate(add.input) if g.scalar(n) is not None]
        if len(eps_at) != 1:
            continue
        mean = g.made(add.input[1 - eps_at[0]], "ReduceMean")
        if mean is None or not _last_axis(g, mean):
            continue
        power = g.made(mean.input[0], "Pow")
        if power is None or power.input[0] != xf or g.scalar(power.input[1]) != 2.0:
            continue
        chain = [power, mean, add, sqrt, inv, scaled, back]
        if any(len(g.readers.get(n.output[0], ())) != 1 or n.output[0] in g.outputs for n in chain):
            continue  # an intermediate value read elsewhere: not a plain RMSNorm
        return [up, *chain, mul], up.input[0], weights[0], g.scalar(add.input[eps_at[0]])
    return None


def _last_axis(g: GraphIndex, mean: onnx.NodeProto) -> bool:
    keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
    axes = next((list(a.ints) for a in mean.attribute if a.name == "axes"), None)
    if axes is None and len(mean.input) > 1:
        value = g.constant(mean.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return keepdims == 1 and axes == [-1]


def fuse_rms_norms(graph: onnx.GraphProto) -> int:
    """Replace each RMSNorm of a float32 graph with SimplifiedLayerNormalization; return how many."""
    g = GraphIndex(graph)
    replace: dict[str, onnx.NodeProto] = {}
    drop: set[str] = set()
    rename: dict[str, str] = {}
    for node in graph.node:
        found = _rms_norm(g, node)
        if found is None:
            continue
        nodes, x, weight, eps = found
        up = nodes[0]
        if up.output[0] in g.outputs or not all(n.name for n in nodes):
            continue  # nodes are told apart by name below
        replace[node.name] = helper.make_node(
            "SimplifiedLayerNormalization", [x, weight], [node.output[0]], name=f"{node.name}/rms_norm",
            axis=-1, epsilon=eps, stash_type=1,
        )  # fmt: skip
        drop.update(n.name for n in nodes)
        rename[up.output[0]] = x  # the upcast of a float32 value is the value: its other readers get x
    if not replace:
        return 0
    kept = []
    for node in graph.node:
        if node.name in replace:
            kept.append(replace[node.name])
        elif node.name not in drop:
            for i, name in enumerate(node.input):
                node.input[i] = rename.get(name, name)
            kept.append(node)
    read = {name for node in kept for name in node.input}
    kept = [n for n in kept if n.op_type != "Constant" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    return len(replace)


def islands(graph: onnx.GraphProto, limit: int = 24) -> list[str]:
    """Names of the nodes to keep in float32.

    From each Cast(to=FLOAT), every path through weightless arithmetic (_ISLAND_OPS, no
    tensor-sized constant or initializer read) must reach another Cast(to=FLOAT) within `limit`
    nodes, or there is no island; with each island, the constants it reads and the casts and
    reshapes between them and it (_SOURCE_OPS).
    """
    g = GraphIndex(graph)

    def island_from(start: onnx.NodeProto) -> dict[str, onnx.NodeProto] | None:
        island, frontier = {start.name: start}, [start]
        while frontier:
            node = frontier.pop()
            if node is not start and _upcast(node):
                continue  # the cast back ends this path
            if node is not start and (node.op_type not in _ISLAND_OPS
                                      or any(g.size(name) > 1 for name in node.input)):  # fmt: skip
                return None
            for name in node.output:
                if name in g.outputs or name not in g.readers:
                    return None
                for reader in g.readers[name]:
                    if not reader.name:
                        return None  # the converter's block list goes by name
                    if reader.name not in island:
                        island[reader.name] = reader
                        frontier.append(reader)
            if len(island) > limit:
                return None
        return island

    blocked: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        island = island_from(node) if _upcast(node) else None
        if island is not None and len(island) > 2:
            blocked.update(island)
    members, sources = set(blocked), list(blocked.values())
    while sources:
        node = sources.pop()
        for name in node.input if node.name in members else node.input[:1]:
            source = g.producer.get(name)
            named = source is not None and bool(source.name)
            if named and source.op_type in _SOURCE_OPS and source.name not in blocked:
                blocked[source.name] = source
                sources.append(source)
    return list(blocked)
