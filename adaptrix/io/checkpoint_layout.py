"""Does a base checkpoint hold the model its config.json describes? Layers, and shapes by role.

A merged output must load with transformers with no missing or unexpected keys; a checkpoint
whose config says 4 layers while its shards hold 2, or whose embedding is not [vocab_size,
hidden_size], would not. The binder knows each module's roles and layout, and the config the
dimensions: together they give the shape of every tensor with a role, checked here before
anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from adaptrix.binders.table import Binder, Layout, Module, Placement, Stack
from adaptrix.io.safetensors_io import TensorInfo
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.role_shapes import role_shape
from adaptrix.ir.values import Role, SourceModel, is_module_role

__all__ = ["check_layout", "expected_shape"]

_FIX = "the config.json and the weights are of different models: restore the base as it was saved"
_FIX_MISSING = "a shard or an index entry is missing or wrong: restore the base as it was saved"
# Roles whose module every model of a family with a binder has (its binder lists it if it has it).
_ALWAYS = {Role.EMBED, Role.EMBED_POS, Role.EMBED_TYPE, Role.EMBED_NORM, Role.FINAL_NORM}


def check_layout(
    binder: Binder, config: Mapping[str, object], source: SourceModel, tensors: Mapping[str, TensorInfo],
    path: Path,
) -> None:  # fmt: skip
    """Refuse a checkpoint whose layers or tensor shapes disagree with its config (`path`: config.json)."""
    _check_layers(binder, source, tensors, path)
    model_level: set[int] = set()  # the model-level modules with a weight (a module may have aliases)
    for name, info in tensors.items():
        module_name, _, param = name.rpartition(".")
        placement = binder.resolve(module_name)
        if placement is None:
            continue
        if placement.layer is None and param == "weight":
            model_level.add(id(placement.module))
        expected = expected_shape(placement, param, source)
        if expected is not None and not _fits(info.shape, expected):
            shown = ["?" if n is None else n for n in expected]
            raise BadInputError(
                f"describes a model whose {name} is {shown}, but {info.file.name} holds it as "
                f"{list(info.shape)}",
                path=path,
                fix=_FIX,
            )
    for key in _required_model_modules(binder, config, source):
        if id(binder.model_modules[key]) not in model_level:
            raise BadInputError(f"describes a {binder.name} model with a {key}, but the weights hold no "
                                f"{key}.weight", path=path, fix=_FIX_MISSING)  # fmt: skip


def _required_model_modules(binder: Binder, config: Mapping[str, object], source: SourceModel) -> list[str]:
    """The model-level modules every model of the family has: embeddings, final norm; an untied head."""
    architectures = config.get("architectures")
    names = architectures if isinstance(architectures, list) else []
    causal = any(isinstance(a, str) and ("LMHead" in a or "CausalLM" in a) for a in names)
    required = []
    stored_head = binder.lm_head_weight.rpartition(".")[0]  # a head another transformers names otherwise
    for key, module in binder.model_modules.items():
        untied = causal and not source.tie_word_embeddings
        head = module.roles == (Role.LM_HEAD,) and key == stored_head and untied
        if head or set(module.roles) & _ALWAYS:
            required.append(key)
    return required


def expected_shape(placement: Placement, param: str, source: SourceModel) -> tuple[int | None, ...] | None:
    """The stored shape a module's weight or bias must have (None: a dimension the config leaves open)."""
    module = placement.module
    if module.shape is not None:  # a module role: its shape is the module tree's
        return _tree_shape(module, param)
    shapes = [role_shape(role, source) for role in module.roles]
    outs = [out for out, _ in shapes]
    out = None if None in outs else sum(outs)
    size_in = shapes[0][1]
    if module.layout is Layout.NORM:
        return (out,) if param in ("weight", "bias") else None
    if param == "bias":
        return (out,)
    if param != "weight":
        return None
    if module.layout is Layout.CONV1D:
        return (size_in, out)
    return (out, size_in)


def _tree_shape(module: Module, param: str) -> tuple[int, ...] | None:
    """The shape the module tree gives a module role's weight or bias."""
    shape = module.shape or ()
    if param == "weight":
        return shape
    if param != "bias" or not shape:
        return None
    if module.layout is Layout.NORM:
        return shape
    return (shape[1],) if module.layout is Layout.CONV1D else (shape[0],)


def _fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(
        e is None or e == n for n, e in zip(shape, expected, strict=True)
    )


def _check_layers(binder: Binder, source: SourceModel, tensors: Mapping[str, TensorInfo], path: Path) -> None:
    """Layers 0 .. num_layers - 1 of each layer stack hold the same tensors (optional modules aside).

    With modules from the module tree (whose layers may differ: MoE layers between dense ones)
    only the count of layers and the table's modules in layer 0 are checked; shapes are
    checked module by module against the tree.
    """
    if binder.stacks:
        for stack in binder.stacks:
            _check_stack(binder, stack, int(stack.count or 0), tensors, path)
    elif binder.layer_container != "\0":  # "\0": no layer stack (a stackless tree)
        whole = Stack(binder.layer_container, (), binder.layer_modules, binder.optional_modules)
        _check_stack(binder, whole, source.num_layers, tensors, path)


def _check_stack(
    binder: Binder, stack: Stack, count: int, tensors: Mapping[str, TensorInfo], path: Path
) -> None:
    """One stack's layers: exactly 0 .. count - 1, layer 0 complete, the others equal to it."""
    container = stack.container
    pattern = re.compile(rf"(?:.*\.)?{re.escape(container)}\.(\d+)\.(.+)")
    layers: dict[int, set[str]] = {}
    for name in tensors:
        if match := pattern.fullmatch(name):
            layers.setdefault(int(match.group(1)), set())
            if match.group(2).rpartition(".")[0] not in stack.optional_modules:
                layers[int(match.group(1))].add(match.group(2))
    # count distinct numbers from 0 to count - 1 are exactly the layers (range(count) may be huge)
    complete = len(layers) == count and min(layers, default=0) == 0 and max(layers, default=-1) == count - 1
    if not complete:
        held = _ranges(sorted(layers))
        where = f"{container} " if binder.stacks else ""
        raise BadInputError(
            f"says the model has {count} {where}layers, but the weights hold {where}layers {held or 'none'}",
            path=path,
            fix=_FIX,
        )
    first = layers.get(0, set())
    required = [key for key, module in stack.layer_modules.items()
                if key not in stack.optional_modules and not is_module_role(module.roles[0])]  # fmt: skip
    if lacking := sorted(f"{key}.weight" for key in required if f"{key}.weight" not in first):
        where = f"{container}.0.{lacking[0]}"
        raise BadInputError(f"describes a {binder.name} model, but layer 0 of the weights has no {where}",
                            path=path, fix=_FIX_MISSING)  # fmt: skip
    for layer, names in sorted(layers.items()):
        if binder.tree_source is not None:
            break  # the tree's layers may differ from one another
        if names != first:
            lacking = sorted(first - names) or sorted(names - first)
            side = "lacks" if first - names else "has an extra"
            raise BadInputError(
                f"layer {layer} of the weights {side} {container}.{layer}.{lacking[0]} (layer 0 differs)",
                path=path.parent,
                fix=_FIX_MISSING,
            )


def _ranges(numbers: list[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
