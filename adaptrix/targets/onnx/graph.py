"""Where each of the base's tensors lives in an exported graph, found by what uses it.

optimum's exporter names the initializers of nn.Linear weights anonymously (`onnx::MatMul_733`,
stored transposed, [in, out]) and deduplicates equal tensors through Identity nodes; a tied head
reads its embedding through a Transpose. So a tensor is found by its consumers: a MatMul or Gemm
belongs to the module its node is named after (`/model/layers.0/self_attn/q_proj/MatMul`), and
any other input is named after the tensor itself. Each use records whether the initializer holds
the tensor as stored by Hugging Face or transposed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from adaptrix.binders.table import Layout

__all__ = ["GraphIndex", "Use", "initializer_users", "insert_after", "module_of_node", "tensor_uses"]

_PASS_THROUGH = ("Identity", "Transpose")


@dataclass(frozen=True, slots=True)
class Use:
    """One node input that reads a base tensor from an initializer."""

    node: int  # the consuming node's position in graph.node
    index: int  # which of its inputs
    initializer: str  # the initializer the input resolves to
    stored_transposed: bool  # the initializer holds the tensor transposed
    input_transposed: bool  # the node's input receives the tensor transposed


def module_of_node(node: onnx.NodeProto) -> str:
    """The module a node belongs to: `/model/layers.0/mlp/up_proj/MatMul` -> `model.layers.0.mlp.up_proj`."""
    return node.name.strip("/").rpartition("/")[0].replace("/", ".")


def tensor_uses(
    graph: onnx.GraphProto,
    tensor_name: Callable[[str], str | None],
    layout_of: Callable[[str], Layout | None],
) -> dict[str, list[Use]]:
    """{checkpoint tensor name: its uses} for every node input that resolves to an initializer.

    `tensor_name` maps a graph name to the checkpoint's tensor name (or None); `layout_of` gives
    the binder's layout of a module, or None when the binder does not know the module.
    """
    initializers = {init.name for init in graph.initializer}
    producers = {out: node for node in graph.node if node.op_type in _PASS_THROUGH for out in node.output}
    uses: dict[str, list[Use]] = defaultdict(list)
    for position, node in enumerate(graph.node):
        if node.op_type in _PASS_THROUGH:
            continue
        for index, name in enumerate(node.input):
            chain = _chain(name, producers, initializers)
            if chain is None:
                continue
            found = _weight_of_module(node, index, chain, tensor_name, layout_of)
            if found is None:
                found = _named(chain, tensor_name)
            if found is not None:
                tensor, stored_t, input_t = found
                uses[tensor].append(Use(position, index, chain[-1][0], stored_t, input_t))
    return dict(uses)


def _chain(name: str, producers: dict, initializers: set[str]) -> list[tuple[str, bool]] | None:
    """[(name, transposed below here)] from a node input down to its initializer, or None."""
    names = [name]
    while name not in initializers:
        node = producers.get(name)
        if node is None or (node.op_type == "Transpose" and _perm(node) not in (None, [1, 0])):
            return None
        name = node.input[0]
        names.append(name)
    flips, chain = 0, []
    for link in reversed(names):  # from the initializer up, counting Transposes
        node = producers.get(link)
        if node is not None and node.op_type == "Transpose":
            flips += 1
        chain.append((link, flips % 2 == 1))
    return list(reversed(chain))


def _perm(node: onnx.NodeProto) -> list[int] | None:
    attr = next((a for a in node.attribute if a.name == "perm"), None)
    return list(attr.ints) if attr is not None else None


def _weight_of_module(node, index, chain, tensor_name, layout_of) -> tuple[str, bool, bool] | None:
    """A MatMul's / Gemm's weight (or a Gemm's bias), named after the module of its node."""
    if (
        node.op_type not in ("MatMul", "Gemm")
        or index not in (1, 2)
        or (index == 2 and node.op_type != "Gemm")
    ):
        return None
    module = module_of_node(node)
    layout = layout_of(module)
    if layout is None:
        return None
    tensor = tensor_name(f"{module}.{'weight' if index == 1 else 'bias'}")
    if tensor is None:
        return None
    if index == 2:
        return tensor, chain[0][1], False
    # The matrix x is multiplied by: MatMul takes its input as is; Gemm with transB=1 transposes it.
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
    # Hugging Face stores nn.Linear as [out, in] (x @ W.T) and Conv1D as [in, out] (x @ W).
    input_t = (layout is not Layout.CONV1D) != bool(trans_b)
    stored_t = input_t != chain[0][1]
    return tensor, stored_t, input_t


def _named(chain, tensor_name) -> tuple[str, bool, bool] | None:
    """An input whose chain passes through a name of the checkpoint (biases, norms, embeddings)."""
    for link, transposed_below in chain:
        tensor = tensor_name(link)
        if tensor is not None:
            input_t = chain[0][1] != transposed_below
            return tensor, transposed_below, input_t
    return None


def insert_after(graph: onnx.GraphProto, after: dict[int, list[onnx.NodeProto]]) -> None:
    """Put `after[i]`'s nodes right after the graph's node i, keeping the order of everything else."""
    ordered = []
    for position, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(after.get(position, ()))
    del graph.node[:]
    graph.node.extend(ordered)


def initializer_users(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs (through Identity / Transpose) and graph outputs read each initializer."""
    initializers = {init.name for init in graph.initializer}
    producers = {out: node for node in graph.node if node.op_type in _PASS_THROUGH for out in node.output}
    counts: dict[str, int] = defaultdict(int)
    names = [name for node in graph.node if node.op_type not in _PASS_THROUGH for name in node.input]
    names += [output.name for output in graph.output]
    for name in names:
        chain = _chain(name, producers, initializers)
        if chain is not None:
            counts[chain[-1][0]] += 1
    return dict(counts)


class GraphIndex:
    """Who makes and who reads each value of a graph, and the values of its constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {name: node for node in graph.node for name in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {value.name for value in graph.output}

    def weight(self, name: str) -> onnx.TensorProto | None:
        """The initializer `name` is, directly or through Identity (the exporter's shared weights)."""
        while (node := self.made(name, "Identity")) is not None:
            name = node.input[0]
        return self.initializers.get(name)

    def made(self, name: str, op: str) -> onnx.NodeProto | None:
        """The node that makes `name`, if it is an `op` node."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def tensor(self, name: str) -> onnx.TensorProto | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.made(name, "Constant")
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return node.attribute[0].t
        return None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer held in the graph or of a Constant node, else None."""
        value = self.tensor(name)
        if value is None or value.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(value)

    def size(self, name: str) -> int:
        """Elements of a constant or initializer (1 for anything else)."""
        value = self.tensor(name)
        return 1 if value is None else math.prod(value.dims)

    def scalar(self, name: str) -> float | None:
        """A one-element constant's value as a float, else None."""
        value = self.constant(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None
