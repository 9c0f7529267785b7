"""Bottleneck adapters (AdapterHub SeqBn / DoubleSeqBn / ParBn) put into an exported graph as nodes.

For each op the block's output h and residual r are found by what uses the projection's weight:
h is the output of the projection's MatMul (or of its bias Add, named after the same module), and
the single node reading h is the residual Add, whose other input is r. On Llama that Add is the
join: its output is the residual stream. On BERT the Add feeds the layer's LayerNormalization,
whose output is the join. The join's producers are replaced by nodes computing what AdapterHub's
adapter layer returns, final(h, r) (the formulas are in `adaptrix.ir.bottleneck`), under
the join's own name, so every downstream consumer reads the adapted stream. The layer's own
LayerNorm is reused (its weight, bias and attributes) wherever the options apply it.

Weights are stored for MatMul ([in, out]) in the graph's float type, one initializer per tensor:
a tensor several ops share (weights shared across layers) is one initializer they all read.
Inserted after the merged patches and attention fusion, which find nodes by position.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.bottleneck import Bottleneck, LayerNormParams
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR, Site
from adaptrix.lowering.bottleneck_entries import layer_prefix
from adaptrix.targets.onnx.bottleneck_ops import ONNX_ACTIVATIONS, NodeWriter
from adaptrix.targets.onnx.graph import module_of_node
from adaptrix.targets.onnx.patch import base_uses

__all__ = ["InsertedBottlenecks", "insert_bottlenecks", "split_bottlenecks"]

logger = logging.getLogger(__name__)

_FIX = "use --target hooks, which runs bottlenecks unmerged"


@dataclass(frozen=True, slots=True)
class InsertedBottlenecks:
    """What was inserted: manifest entries, new initializers' values, the MatMuls added."""

    entries: list[dict]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    matmuls: list[str] = field(default_factory=list)

    @property
    def manifest(self) -> dict:
        """The manifest's `onnx.bottlenecks` section."""
        return {"sites": self.entries, "initializers": len(self.values)}


@dataclass(frozen=True, slots=True)
class _Join:
    """Where one block's output meets its residual in the graph."""

    h: str
    r: str
    output: str  # the join tensor: the residual stream after the block (LN(h + r) on BERT)
    replaced: tuple[int, ...]  # positions of the nodes computing it (the Add, and BERT's LN)
    norm: onnx.NodeProto | None  # the layer's LayerNormalization (BERT), reused
    dtype: int  # the graph's float type at h


def split_bottlenecks(ir: AdapterIR) -> tuple[AdapterIR, list[tuple[Site, Bottleneck]]]:
    """The IR without its Bottleneck ops, and those ops (checked to have an ONNX activation)."""
    ops = [(site, op) for site, op in ir if isinstance(op, Bottleneck)]
    for site, op in ops:
        if op.act.lower() not in ONNX_ACTIVATIONS:
            raise UnsupportedError(
                f"{site}: activation {op.act!r} of a bottleneck has no ONNX form here",
                fix=f"use --target hooks; ONNX takes {', '.join(sorted(ONNX_ACTIVATIONS))}",
            )
    rest = tuple((site, op) for site, op in ir if not isinstance(op, Bottleneck))
    return AdapterIR(rest, ir.source, ir.name), ops


def insert_bottlenecks(
    model: onnx.ModelProto, base: Checkpoint, ops: list[tuple[Site, Bottleneck]]
) -> InsertedBottlenecks:
    """Put each bottleneck into `model`'s graph in place of its block's join (see the module doc)."""
    graph = model.graph
    uses = base_uses(base, graph)
    consumers: dict[str, list[int]] = defaultdict(list)
    for position, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(position)
    outputs = {value.name for value in graph.output}
    constants: dict[tuple, str] = {}
    stored: dict[int, str] = {}  # id(LazyTensor) -> its initializer
    inserted = InsertedBottlenecks([])
    at: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for site, op in ops:
        where = f"layer {site.layer} {op.block}"
        prefix, projection = layer_prefix(base, site, op)
        points = base.binder.bottleneck_points[str(op.block)]
        join = _find_join(graph, (uses, consumers, outputs), f"{projection}.weight", points.norm, where)
        if dropped & set(join.replaced):
            raise UnsupportedError(f"{where}: two bottlenecks at one block", fix=_FIX)
        residual_add = graph.node[join.replaced[0]].name  # `/model/layers.0/Add_1`: named as optimum names
        stem = f"{residual_add.rpartition('/')[0]}/adaptrix_bottleneck_{op.block}"
        writer = NodeWriter(graph, stem, join.dtype, constants)
        names = _tensor_names(op, f"{prefix}{points.block}.bottleneck", join.dtype, stored, graph, inserted)
        _final(writer, op, join, names)
        writer.nodes[-1].output[0] = join.output
        dropped.update(join.replaced)
        at[max(join.replaced)] = writer.nodes
        inserted.matmuls.extend(node.name for node in writer.nodes if node.op_type == "MatMul")
        inserted.entries.append({"site": str(site), "block": str(op.block), "size": op.size,
                                 "act": op.act.lower(), "parallel": op.parallel, "shared": op.shared,
                                 "nodes": len(writer.nodes)})  # fmt: skip
    ordered = []
    for position, node in enumerate(graph.node):
        ordered.extend([node] if position not in dropped else at.get(position, []))
    del graph.node[:]
    graph.node.extend(ordered)
    logger.info("inserted %d bottleneck adapters into the graph", len(ops))
    return inserted


def _find_join(graph, found: tuple, weight: str, norm_name: str | None, where: str) -> _Join:
    """h, r and the join of one block, or an error naming the layer and block.

    `found` is (the base's tensor uses, the readers of each tensor, the graph's outputs);
    `norm_name` is the layer's norm after the residual Add (BERT), or None (Llama).
    """
    uses, consumers, outputs = found
    use = next((u for u in uses.get(weight, ()) if u.index == 1
                and graph.node[u.node].op_type in ("MatMul", "Gemm")), None)  # fmt: skip
    if use is None:
        raise UnsupportedError(f"{where}: the exported graph has no MatMul reading {weight}", fix=_FIX)
    matmul = graph.node[use.node]
    dtype = next(init.data_type for init in graph.initializer if init.name == use.initializer)
    h = matmul.output[0]
    readers = _readers(h, consumers, outputs, graph)
    bias = readers[0] if len(readers) == 1 and readers[0].op_type == "Add" else None
    if bias is not None and module_of_node(bias) == module_of_node(matmul):
        h = bias.output[0]  # the projection's bias Add
        readers = _readers(h, consumers, outputs, graph)
    if len(readers) != 1 or readers[0].op_type != "Add":
        found = ", ".join(f"{n.op_type} {n.name}" for n in readers) or "nothing"
        raise UnsupportedError(
            f"{where}: the block's output h ({h}) should feed one residual Add; it feeds {found}", fix=_FIX
        )
    add = readers[0]
    r = add.input[1] if add.input[0] == h else add.input[0]
    replaced, output, norm = [consumers[h][0]], add.output[0], None
    if norm_name is not None:
        following = _readers(output, consumers, outputs, graph)
        norm = following[0] if len(following) == 1 else None
        if norm is None or norm.op_type != "LayerNormalization" or any(norm.output[1:]):
            found = ", ".join(f"{n.op_type} {n.name}" for n in following) or "nothing"
            raise UnsupportedError(
                f"{where}: the residual Add ({output}) should feed the layer's {norm_name} as one "
                f"LayerNormalization with one output; it feeds {found}",
                fix=_FIX,
            )
        replaced.append(consumers[output][0])
        output = norm.output[0]
    return _Join(h, r, output, tuple(replaced), norm, dtype)


def _readers(name: str, consumers, outputs, graph) -> list[onnx.NodeProto]:
    """The nodes reading `name`; a graph output counts as a reader (a stand-in node named after it)."""
    found = [graph.node[position] for position in consumers.get(name, ())]
    return found + [helper.make_node("Output", [name], [], name=name)] * (name in outputs)


def _tensor_names(op: Bottleneck, key: str, dtype: int, stored: dict, graph, inserted) -> dict[str, str]:
    """Initializer names of the op's tensors (matrices as MatMul takes them), stored once each."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    names = {}
    for name, tensor in op.tensors().items():
        if id(tensor) not in stored:
            value = tensor.load().float()
            value = value.T if name in ("down", "up") else value
            array = np.ascontiguousarray(value.numpy().astype(np_dtype))
            stored[id(tensor)] = initializer = f"{key}.{name}"
            graph.initializer.append(onnx.TensorProto(name=initializer, data_type=dtype, dims=array.shape))
            inserted.values[initializer] = array
        names[name] = stored[id(tensor)]
    return names


def _final(w: NodeWriter, op: Bottleneck, join: _Join, t: dict[str, str]) -> str:
    """AdapterHub's adapter layer output for h and r (ir_bottleneck's formulas)."""
    h, r = join.h, join.r
    if op.parallel:
        out = w("Add", _own_norm(w, op.ln_after, "ln_after", _branch(w, op, r, t), t), h)
    else:
        joined = w("Add", h, r) if op.original_ln_before else None
        x = _layer_norm(w, join, joined) if joined is not None else h
        res = h if op.residual_before_ln is True else (joined if op.residual_before_ln == "post_add" else x)
        y = _branch(w, op, x, t)
        if op.adapter_residual_before_ln:
            out = _own_norm(w, op.ln_after, "ln_after", w("Add", y, res), t)
        else:
            out = w("Add", _own_norm(w, op.ln_after, "ln_after", y, t), res)
    return _layer_norm(w, join, w("Add", out, r)) if op.original_ln_after else out


def _branch(w: NodeWriter, op: Bottleneck, x: str, t: dict[str, str]) -> str:
    """The branch: scale * (up @ act(down @ ln_before(x) + down_bias) + up_bias)."""
    down = w("MatMul", _own_norm(w, op.ln_before, "ln_before", x, t), t["down"])
    down = w("Add", down, t["down_bias"]) if "down_bias" in t else down
    up = w("MatMul", ONNX_ACTIVATIONS[op.act.lower()](w, down), t["up"])
    up = w("Add", up, t["up_bias"]) if "up_bias" in t else up
    return up if op.scale == 1.0 else w("Mul", up, w.const(op.scale))


def _own_norm(w: NodeWriter, norm: LayerNormParams | None, name: str, x: str, t: dict[str, str]) -> str:
    """The adapter's own LayerNorm (ln_before / ln_after), or x where it has none."""
    if norm is None:
        return x
    return w("LayerNormalization", x, t[f"{name}_weight"], t[f"{name}_bias"], axis=-1, epsilon=norm.eps)


def _layer_norm(w: NodeWriter, join: _Join, x: str) -> str:
    """The layer's own LayerNorm (BERT: the exported node's weights and attributes), or x (Llama)."""
    if join.norm is None:
        return x
    output = w("LayerNormalization", x, *join.norm.input[1:])
    w.nodes[-1].attribute.extend(join.norm.attribute)
    return output
