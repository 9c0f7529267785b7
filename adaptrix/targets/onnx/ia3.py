"""--unmerged IA3: a module's output or input multiplied by an overridable vector.

A module whose output an adapter scales gets a graph input `<module>.ia3_out` [out_features] and a
Mul after its whole output: after the bias (the Gemm's own, or the Add that follows its MatMul),
since IA3 scales the bias too, and, for a fused module, over every role's rows (1 where a role has
no scale). One whose input is scaled (PEFT's feedforward_modules) gets `<module>.ia3_in`
[in_features] and a Mul on the input of its MatMul / Gemm. Both inputs are backed by initializers
of ones of the same names: with no adapter active the graph computes the base exactly.

These go in before the LoRA branches, which then read the scaled input and add their delta before
the output Mul: y = v_out * ((x * v_in) (W + A B) + b), the order the merged target and the hooks
runtime apply (weight deltas first, then IA3's scales).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper

from adaptrix.ir.errors import UnsupportedError
from adaptrix.lowering.module_pairs import ModuleScales
from adaptrix.targets.onnx.graph import Use
from adaptrix.targets.onnx.lora import initializer_dtype, module_matmul

__all__ = ["ScaleInput", "add_scale_inputs", "scale_parameters"]

_SUFFIXES = {"out": "ia3_out", "in": "ia3_in"}


@dataclass(frozen=True, slots=True)
class ScaleInput:
    """One overridable IA3 vector of a module: its graph input and what it scales."""

    module: str
    name: str  # `<module>.ia3_out` or `<module>.ia3_in`
    axis: str  # "out" or "in"
    features: int
    dtype: np.dtype  # the dtype of the module's weight, as the LoRA branch's


def add_scale_inputs(
    model: onnx.ModelProto, uses: dict[str, list[Use]], modules: Sequence[ModuleScales]
) -> list[ScaleInput]:
    """Give each scaled module a Mul by an overridable vector of ones on its output or input."""
    graph = model.graph
    before: dict[int, list[onnx.NodeProto]] = {}
    after: dict[int, list[onnx.NodeProto]] = {}
    inputs = []
    for scales in modules:
        name = scales.placement.name
        use = module_matmul(graph, uses, name, scales.weight)
        node = graph.node[use.node]
        dtype = initializer_dtype(graph, use.initializer)
        prefix = node.name.rpartition("/")[0] + "/ia3"
        if scales.in_ is not None:
            vector = _add_vector(graph, name, "in", len(scales.in_), dtype)
            scaled = f"{prefix}/input_scaled"
            before.setdefault(use.node, []).append(
                helper.make_node("Mul", [node.input[0], vector.name], [scaled], name=f"{prefix}/Mul_in")
            )
            node.input[0] = scaled
            inputs.append(vector)
        if scales.out is not None:
            vector = _add_vector(graph, name, "out", len(scales.out), dtype)
            position = _output_node(graph, uses, scales, use)
            producer = graph.node[position]
            output = producer.output[0]
            producer.output[0] = f"{output}/adaptrix_unscaled"
            after.setdefault(position, []).append(
                helper.make_node("Mul", [producer.output[0], vector.name], [output], name=f"{prefix}/Mul_out")
            )
            inputs.append(vector)
    ordered = []
    for position, node in enumerate(graph.node):
        ordered.extend(before.get(position, ()))
        ordered.append(node)
        ordered.extend(after.get(position, ()))
    del graph.node[:]
    graph.node.extend(ordered)
    return inputs


def _add_vector(graph: onnx.GraphProto, module: str, axis: str, features: int, dtype: int) -> ScaleInput:
    """The graph input `<module>.ia3_<axis>` [features] and its default, an initializer of ones."""
    name = f"{module}.{_SUFFIXES[axis]}"
    ones = np.ones(features, dtype=helper.tensor_dtype_to_np_dtype(dtype))
    graph.input.append(helper.make_tensor_value_info(name, dtype, [features]))
    graph.initializer.append(helper.make_tensor(name, dtype, [features], ones.tobytes(), raw=True))
    return ScaleInput(module, name, axis, features, ones.dtype)


def _output_node(graph: onnx.GraphProto, uses: dict[str, list[Use]], scales: ModuleScales, use: Use) -> int:
    """The position of the node giving the module's whole output: its Gemm, or its bias Add."""
    node = graph.node[use.node]
    if scales.bias is None or (node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]):
        return use.node
    found = [u.node for u in uses.get(scales.bias, ()) if graph.node[u.node].op_type == "Add"
             and node.output[0] in graph.node[u.node].input]  # fmt: skip
    if len(found) != 1:
        raise UnsupportedError(
            f"{scales.placement.name}: the exported graph does not add its bias right after its "
            f"{node.op_type}, so an IA3 output scale cannot follow it",
            fix="compile without --unmerged, or use --target hooks",
        )
    return found[0]


def scale_parameters(scales: Sequence[ModuleScales], inputs: Sequence[ScaleInput]) -> dict[str, np.ndarray]:
    """One adapter's IA3 vectors by graph input name, in the inputs' dtypes."""
    by_name = {vector.name: vector for vector in inputs}
    params = {}
    for module in scales:
        for axis, value in (("out", module.out), ("in", module.in_)):
            if value is None:
                continue
            vector = by_name[f"{module.placement.name}.{_SUFFIXES[axis]}"]
            params[vector.name] = np.ascontiguousarray(value.to(torch.float32).numpy().astype(vector.dtype))
    return params
