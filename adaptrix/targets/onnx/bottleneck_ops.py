"""ONNX nodes for a bottleneck adapter's arithmetic: a node writer and the activations as ONNX ops.

Each activation spells out the formula of `adaptrix.runtimes.hooks.activations` (transformers' ACT2FN)
with standard ONNX operators, so that a graph computes what the hooks runtime and AdapterHub do.
Scalars are initializers in the graph's float type, one per (value, type), shared by every node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["ONNX_ACTIVATIONS", "NodeWriter"]

_CONSTANTS = "adaptrix/bottleneck/const"


class NodeWriter:
    """Collects new nodes named under `stem`; `writer(op, *inputs, **attrs)` returns the output name."""

    def __init__(self, graph: onnx.GraphProto, stem: str, dtype: int, constants: dict[tuple, str]):
        self.graph, self.stem, self.dtype = graph, stem, dtype
        self.constants = constants  # shared by the writers of one graph
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op_type: str, *inputs: str, **attrs) -> str:
        """Append one node; its single output is named after it."""
        name = f"{self.stem}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [f"{name}_output_0"], name=name, **attrs))
        return self.nodes[-1].output[0]

    def const(self, value: float) -> str:
        """A scalar initializer holding `value` in the graph's float type."""
        key = (self.dtype, float(value))
        if key not in self.constants:
            np_dtype = helper.tensor_dtype_to_np_dtype(self.dtype)
            name = f"{_CONSTANTS}/{np.dtype(np_dtype).name}/{len(self.constants)}"
            self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np_dtype), name))
            self.constants[key] = name
        return self.constants[key]


def _gelu(w: NodeWriter, x: str) -> str:
    """Exact GELU as torch computes it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = w("Erf", w("Mul", x, w.const(1.0 / math.sqrt(2.0))))
    return w("Mul", w("Mul", x, w.const(0.5)), w("Add", erf, w.const(1.0)))


def _gelu_tanh(w: NodeWriter, x: str) -> str:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    cube = w("Mul", w("Mul", x, x), x)
    inner = w("Mul", w("Add", x, w("Mul", cube, w.const(0.044715))), w.const(math.sqrt(2.0 / math.pi)))
    return w("Mul", w("Mul", x, w.const(0.5)), w("Add", w("Tanh", inner), w.const(1.0)))


def _gelu_fast(w: NodeWriter, x: str) -> str:
    """Fast GELU: 0.5 x (1 + tanh(x * 0.7978845608 * (1 + 0.044715 x^2)))."""
    square = w("Mul", w("Mul", x, x), w.const(0.044715))
    inner = w("Mul", w("Mul", x, w.const(0.7978845608)), w("Add", square, w.const(1.0)))
    return w("Mul", w("Mul", x, w.const(0.5)), w("Add", w("Tanh", inner), w.const(1.0)))


def _silu(w: NodeWriter, x: str) -> str:
    return w("Mul", x, w("Sigmoid", x))


def _quick_gelu(w: NodeWriter, x: str) -> str:
    return w("Mul", x, w("Sigmoid", w("Mul", x, w.const(1.702))))


def _leaky_relu(w: NodeWriter, x: str) -> str:
    return w("LeakyRelu", x, alpha=0.01)


def _relu6(w: NodeWriter, x: str) -> str:
    return w("Clip", x, w.const(0.0), w.const(6.0))


def _mish(w: NodeWriter, x: str) -> str:
    return w("Mul", x, w("Tanh", w("Softplus", x)))


# By AdapterHub's (lower-cased) name, the same keys as adaptrix.runtimes.hooks.activations.ACTIVATIONS.
ONNX_ACTIVATIONS: dict[str, Callable[[NodeWriter, str], str]] = {
    "relu": lambda w, x: w("Relu", x),
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "silu": _silu,
    "swish": _silu,
    "tanh": lambda w, x: w("Tanh", x),
    "sigmoid": lambda w, x: w("Sigmoid", x),
    "leakyrelu": _leaky_relu,
    "leaky_relu": _leaky_relu,
    "relu6": _relu6,
    "mish": _mish,
    "linear": lambda w, x: x,
}
