"""A routed adapter (`--pass route`) as graph ops: per token, PEFT's Arrow over the adapters' LoRA pairs.

Each routed module's MatMul / Gemm gets a side branch on its input x:
scores = |x @ P| (P [in, adapters], the prototypes), TopK(top_k), Softmax(values / temperature),
scattered back into a [.., adapters] coefficient tensor (zeros outside the top_k), each adapter's
coefficient repeated over its rank's columns (Gather), and the output gains
((x @ down) * coefficients) @ up, with every adapter's pair side by side in down [in, sum r] and
up [sum r, out] (scales folded into up). Nothing is merged: each adapter stays low-rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from safetensors.torch import save_file

from adaptrix.artifacts import ROUTE_TENSORS
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.route import route_summary
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.route_entries import RoutedPairs, routed_modules
from adaptrix.targets.onnx.graph import Use, insert_after
from adaptrix.targets.onnx.lora import initializer_dtype, module_matmul

__all__ = ["add_route_branches", "routed_of", "write_route_tensors"]

Routed = Sequence[tuple[object, str, RoutedPairs]]


def routed_of(
    ir: AdapterIR, base: Checkpoint, *, unmerged: bool, quantize: str | None, seq2seq: bool
) -> list | None:
    """A routed IR's modules, each with its router (None for an IR that does not route); options checked."""
    if route_summary(ir) is None:
        return None
    given = (("--unmerged", unmerged), (f"--quantize {quantize}", quantize), ("an encoder-decoder", seq2seq))
    refused = [name for name, value in given if value]
    if refused:
        raise UnsupportedError(f"a routed adapter (--pass route) cannot take {refused[0]} in ONNX",
                               fix="leave it out, or use --target hooks")  # fmt: skip
    return routed_modules(ir, base)


def write_route_tensors(modules: Routed, out: Path) -> str:
    """The prototypes of every routed module into route.safetensors (what adaptrix.route reads)."""
    tensors = {
        placement.name: routed.prototypes.to(torch.float32).contiguous() for placement, _, routed in modules
    }
    save_file(tensors, str(out / ROUTE_TENSORS), metadata={"format": "pt"})
    return ROUTE_TENSORS


def add_route_branches(
    model: onnx.ModelProto, uses: dict[str, list[Use]], modules: Routed
) -> dict[str, np.ndarray]:
    """Give each routed module's MatMul its router branch; returns the new initializers' values."""
    graph = model.graph
    after: dict[int, list[onnx.NodeProto]] = {}
    values: dict[str, np.ndarray] = {}
    for placement, weight, routed in modules:
        name = placement.name
        use = module_matmul(graph, uses, name, weight)
        node = graph.node[use.node]
        dtype = initializer_dtype(graph, use.initializer)
        np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
        arrays = _arrays(routed, np_dtype)
        for suffix, array in arrays.items():
            key = f"{name}.route_{suffix}"
            data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph.initializer.append(onnx.TensorProto(name=key, data_type=data_type, dims=array.shape))
            values[key] = array
        output = node.output[0]
        node.output[0] = f"{output}/adaptrix_base"
        prefix = node.name.rpartition("/")[0] + "/route"
        nodes = _nodes(prefix, name, node.input[0], node.output[0], output, dtype)
        after[use.node] = [*_constants(prefix, routed, dtype), *nodes]
    insert_after(graph, after)
    return values


def _arrays(routed: RoutedPairs, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The branch's initializers: prototypes, side-by-side pairs, the column -> adapter map."""
    downs = torch.cat([down for down, _ in routed.pairs], dim=1)
    ups = torch.cat([up for _, up in routed.pairs], dim=0)
    columns = np.concatenate(
        [np.full(down.shape[1], i, np.int64) for i, (down, _) in enumerate(routed.pairs)]
    )
    return {
        "prototypes": routed.prototypes.T.contiguous().to(torch.float32).numpy(),  # routing in float32
        "down": downs.to(torch.float32).numpy().astype(dtype),
        "up": ups.to(torch.float32).numpy().astype(dtype),
        "columns": columns,
    }


def _constants(prefix: str, routed: RoutedPairs, dtype: int) -> list[onnx.NodeProto]:
    """top_k and the temperature as Constant nodes (TopK's k must be known when the graph loads)."""
    k = helper.make_tensor("value", onnx.TensorProto.INT64, [1], [routed.op.top_k])
    temperature = helper.make_tensor("value", onnx.TensorProto.FLOAT, [], [routed.op.temperature])
    return [helper.make_node("Constant", [], [f"{prefix}/k"], name=f"{prefix}/Constant_k", value=k),
            helper.make_node("Constant", [], [f"{prefix}/temperature"], name=f"{prefix}/Constant_t",
                             value=temperature)]  # fmt: skip


def _nodes(prefix: str, name: str, x: str, base: str, output: str, dtype: int) -> list[onnx.NodeProto]:
    """The router's nodes, from the module's input x and base output to its new output.

    The scores, top-k and softmax run in float32 whatever the graph's dtype (float16 on onnx-cuda):
    a rounded score would flip the choice between two adapters whose scores are close.
    """
    key = f"{name}.route_"
    p = f"{prefix}/"
    single = onnx.TensorProto.FLOAT
    zero = helper.make_tensor("value", single, [1], [0])
    wide = x if dtype == single else p + "x_float32"
    by_rank = p + "coeff_r" if dtype == single else p + "coeff_r_float32"
    return [
        *([] if dtype == single else [helper.make_node("Cast", [x], [wide], name=p + "Cast_x", to=single)]),
        helper.make_node("MatMul", [wide, key + "prototypes"], [p + "scores"], name=p + "MatMul_scores"),
        helper.make_node("Abs", [p + "scores"], [p + "abs"], name=p + "Abs"),
        helper.make_node("TopK", [p + "abs", p + "k"], [p + "top", p + "index"], name=p + "TopK", axis=-1),
        helper.make_node("Div", [p + "top", p + "temperature"], [p + "scaled"], name=p + "Div"),
        helper.make_node("Softmax", [p + "scaled"], [p + "weights"], name=p + "Softmax", axis=-1),
        helper.make_node("Shape", [p + "abs"], [p + "shape"], name=p + "Shape"),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "zeros"], name=p + "Zeros", value=zero),
        helper.make_node("ScatterElements", [p + "zeros", p + "index", p + "weights"], [p + "coeff"],
                         name=p + "Scatter", axis=-1),
        helper.make_node("Gather", [p + "coeff", key + "columns"], [by_rank], name=p + "Gather", axis=-1),
        *([] if dtype == single else
          [helper.make_node("Cast", [by_rank], [p + "coeff_r"], name=p + "Cast_coeff", to=dtype)]),
        helper.make_node("MatMul", [x, key + "down"], [p + "low"], name=p + "MatMul_down"),
        helper.make_node("Mul", [p + "low", p + "coeff_r"], [p + "mixed"], name=p + "Mul"),
        helper.make_node("MatMul", [p + "mixed", key + "up"], [p + "delta"], name=p + "MatMul_up"),
        helper.make_node("Add", [base, p + "delta"], [output], name=p + "Add"),
    ]  # fmt: skip
