"""Merged weights written into a copy of the cached base graph, found by the module using each.

An initializer that only the patched tensor uses is replaced in place; one that the exporter
shares with other inputs (equal tensors deduplicated, a tied head's embedding) is left to its
other users and the patched inputs get an initializer of their own. Before a tensor is patched,
a probe of its elements is compared with the base's, so a mapping error cannot go unnoticed.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from adaptrix.artifacts import probe_indices
from adaptrix.binders.table import Layout
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.safetensors_io import read_elements
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.module_pairs import LowRankPair, low_rank_pairs
from adaptrix.lowering.tensor_plan import TensorPlan, merged_value, plan_tensors
from adaptrix.targets.onnx.dead import absent_from_graphs
from adaptrix.targets.onnx.external import Filler, external_location, initializer_bytes, read_initializer
from adaptrix.targets.onnx.graph import Use, initializer_users, module_of_node, tensor_uses
from adaptrix.targets.onnx.packed_patch import is_packed_expert, patch_packed_expert, router_tensor_names

__all__ = ["base_uses", "matmul_weights", "merged_patches", "unused_tensor"]

logger = logging.getLogger(__name__)


def base_uses(base: Checkpoint, graph: onnx.GraphProto, scope: str = "") -> dict[str, list[Use]]:
    """Where each of the base's tensors is used in the exported graph.

    `scope` is the prefix of a graph traced from an inner module (a seq2seq export's encoder
    graph names its nodes `/block.0/...` for `encoder.block.0`): names are looked up in it first.
    """
    tensor_name = _tensor_names(base, scope)

    def layout_of(module: str) -> Layout | None:
        tensor = tensor_name(f"{module}.weight")
        placement = base.binder.resolve(tensor.removesuffix(".weight") if tensor else module)
        return None if placement is None else placement.module.layout

    return tensor_uses(graph, tensor_name, layout_of)


def matmul_weights(base: Checkpoint, graph: onnx.GraphProto, scope: str = "") -> dict[str, set[int]]:
    """{weight: the positions of the MatMul / Gemm nodes named after its module}, whatever they read."""
    tensor_name = _tensor_names(base, scope)
    found: dict[str, set[int]] = defaultdict(set)
    for position, node in enumerate(graph.node):
        if node.op_type in ("MatMul", "Gemm") and (name := tensor_name(f"{module_of_node(node)}.weight")):
            found[name].add(position)
    return found


def _tensor_names(base: Checkpoint, scope: str) -> Callable[[str], str | None]:
    """A graph name -> the checkpoint's tensor it stands for, or None."""
    known = set(base.tensors) | {base.binder.lm_head_weight}
    by_suffix = _by_suffix(known)
    routers = router_tensor_names(base)  # transformers 5 renames Mixtral's routers on load

    def lookup(name: str) -> str | None:
        if name in known:
            return name
        rest = name.partition(".")[2]  # a head model's prefix ("bert.") on a bare base
        if rest in known:
            return rest
        # the exporter traced an inner module (OPT's `/decoder/layers.0/...` in `model.decoder`)
        found = by_suffix.get(name, ())
        if len(found) == 1:
            return next(iter(found))
        parts = name.split(".")
        return next((routers[k] for i in range(len(parts)) if (k := ".".join(parts[i:])) in routers), None)

    def tensor_name(name: str) -> str | None:
        found = (lookup(scope + name) if scope else None) or lookup(name)
        if found is None and _CALL_SUFFIX.search(name):  # a module called again (ALBERT's shared layer)
            return tensor_name(_CALL_SUFFIX.sub("", name))
        return found

    return tensor_name


# The tracer names the nodes of a module's second and later calls `query_1`, `query_2`, ...
_CALL_SUFFIX = re.compile(r"_\d+(?=\.|$)")


def _by_suffix(names: set[str]) -> dict[str, set[str]]:
    """{each proper dotted suffix of a name: the names ending with it}."""
    found: dict[str, set[str]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        for start in range(1, len(parts)):
            found[".".join(parts[start:])].add(name)
    return found


def merged_patches(
    ir: AdapterIR,
    base: Checkpoint,
    model: onnx.ModelProto,
    folder: Path,
    progress: Callable[[int], None] | None = None,
    *,
    patched: set[str] | None = None,
    scope: str = "",
) -> dict[str, np.ndarray]:
    """{initializer: new value, or a function computing it} with the adapter merged; rewires `model`.

    With `patched` (one graph of several), a tensor this graph does not use is left to the others
    and the names of those it does use are added to `patched`; the caller refuses the rest.
    Every MatMul / Gemm named after a changed module (each call of it: `query`, `query_1`) must
    read the tensor where the patcher finds it, or the module is refused: that MatMul would keep
    the base's weight.
    """
    graph = model.graph
    items, _ = plan_tensors(ir, base)
    uses = base_uses(base, graph, scope)
    multiplied = matmul_weights(base, graph, scope)
    users = initializer_users(graph)
    initializers = {init.name: init for init in graph.initializer}
    pairs = {f"{p.placement.name}.weight": p for p in low_rank_pairs(ir, base, torch.float32, strict=False)}
    values: dict[str, np.ndarray] = {}
    taken = _graph_names(graph)
    for item in (item for item in items if item.touched):
        if is_packed_expert(item):  # transformers 5: rows of a packed expert initializer
            patch_packed_expert(item, base, graph, folder, values)
            if progress:
                progress(base.tensors[item.source].nbytes)
            continue
        found = uses.get(item.name, [])
        if multiplied.get(item.name, set()) - {use.node for use in found}:
            raise unused_tensor(item.name, base)  # a MatMul of its module reads something else
        if not found and patched is not None:
            continue  # another graph of the export reads it (the caller refuses a tensor none reads)
        if not found and absent_from_graphs(item.name, item.source, base, [model], folder):
            continue  # the graph never runs the module: its delta cannot change the outputs
        if not found:
            raise unused_tensor(item.name, base)
        if patched is not None:
            patched.add(item.name)
        exact = _check_probe(item, base, found, initializers, folder)
        use = found[0]
        if exact and item.name in pairs and _plain_matmul_weight(found, users, graph, initializers):
            # The cached float32 weight is the base's, already in the [in, out] layout MatMul takes.
            # Computed straight into the output file when it is written: no merged copy in memory.
            values[use.initializer] = _AddLowRank(initializers[use.initializer], folder, pairs[item.name])
        else:
            _patch_general(item, base, found, users, graph, initializers, values, taken)
        if progress:
            progress(base.tensors[item.source].nbytes)
    logger.info("patched %d tensors into the graph", len(values))
    return values


def unused_tensor(name: str, base: Checkpoint) -> UnsupportedError:
    """The refusal for a tensor the adapter changes that no node of the exported graphs reads."""
    module = name.rpartition(".")[0]
    return UnsupportedError(
        f"module {module}: no node of the exported {base.config.get('model_type')} ONNX graph reads "
        f"its tensor {name} as the patcher expects, so the adapter cannot be merged into it",
        path=base.path,
        fix="use --target merged or hooks for this model",
    )


def _plain_matmul_weight(found: list[Use], users: dict, graph: onnx.GraphProto, initializers: dict) -> bool:
    """One use, as a float32 MatMul / Gemm (no transB) weight read from its own external initializer."""
    if len(found) != 1:
        return False
    use = found[0]
    node = graph.node[use.node]
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return (
        use.index == 1
        and (node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b))
        and use.stored_transposed == use.input_transposed
        and users.get(use.initializer) == 1
        and initializers[use.initializer].data_type == onnx.TensorProto.FLOAT
        and external_location(initializers[use.initializer]) is not None  # a small one stays in the graph
    )


class _AddLowRank(Filler):
    """The cached weight [in, out] plus down @ up, in float32, without transposing anything."""

    def __init__(self, init: onnx.TensorProto, folder: Path, pair: LowRankPair):
        self.init, self.folder, self.pair = init, folder, pair

    def start_bytes(self) -> tuple[Path, int]:
        """The cached weight: write_model reads it into the bytes `fill` changes."""
        return initializer_bytes(self.init, self.folder)

    def fill(self, out: np.ndarray) -> None:
        """Add the low-rank product to the cached weight in `out`, in place."""
        torch.from_numpy(out).addmm_(self.pair.down, self.pair.up)


def _patch_general(item, base, found, users, graph, initializers, values, taken) -> None:
    """Merge from the base in float32; give the patched inputs their own initializer where shared.

    A new initializer's name is new to the whole graph (`taken`): the exporter names the Identity
    outputs that share a deduplicated tensor after the checkpoint's tensors too.
    """
    value = merged_value(item, base, torch.float32).numpy()
    groups: dict[str, list[Use]] = defaultdict(list)
    for use in found:
        groups[use.initializer].append(use)
    for name, group in groups.items():
        init = initializers[name]
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        flags = {use.stored_transposed for use in group}
        if users.get(name) == len(group) and len(flags) == 1 and name not in values:
            values[name] = np.ascontiguousarray((value.T if flags.pop() else value).astype(dtype))
            continue
        for transposed in sorted({use.input_transposed for use in group}):
            own = _unique(f"{item.name}.T" if transposed else item.name, taken)
            taken.add(own)
            array = np.ascontiguousarray((value.T if transposed else value).astype(dtype))
            graph.initializer.append(onnx.TensorProto(name=own, data_type=init.data_type, dims=array.shape))
            initializers[own] = graph.initializer[-1]
            values[own] = array
            for use in group:
                if use.input_transposed == transposed:
                    graph.node[use.node].input[use.index] = own


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name of a graph: initializers, inputs, outputs and what its nodes make."""
    names = {init.name for init in graph.initializer}
    names.update(value.name for value in (*graph.input, *graph.output))
    names.update(name for node in graph.node for name in node.output)
    return names


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    return candidate


def _check_probe(
    item: TensorPlan, base: Checkpoint, found: list[Use], initializers: dict, folder: Path
) -> bool:
    """The graph's values at a few elements must be the base tensor's, up to the graph's rounding.

    Returns whether they are exactly equal (a float32 graph holds the base's values exactly).
    """
    info = base.tensors[item.source]
    indices = probe_indices(math.prod(info.shape))
    expected = read_elements(info, indices).to(torch.float64).numpy()
    exact = True
    for use in found:
        stored = read_initializer(initializers[use.initializer], folder)
        shape = tuple(reversed(info.shape)) if use.stored_transposed else tuple(info.shape)
        if tuple(stored.shape) != shape:
            raise BadInputError(
                f"{item.name}: the graph's initializer {use.initializer} has shape {list(stored.shape)}, "
                f"the base's tensor {list(info.shape)}",
                path=folder,
                fix="clear the ONNX cache directory and compile again",
            )
        matrix = stored.T if use.stored_transposed else stored
        flat = (
            matrix.reshape(-1)[indices] if matrix.ndim == 1 else matrix[np.unravel_index(indices, info.shape)]
        )
        got = np.asarray(flat, dtype=np.float64)
        if not np.allclose(got, expected, rtol=2e-3, atol=1e-6):
            raise BadInputError(
                f"{item.name}: the graph's initializer {use.initializer} does not hold the base's values",
                path=folder,
                fix="clear the ONNX cache directory and compile again",
            )
        exact = exact and bool(np.array_equal(got, expected))
    return exact
