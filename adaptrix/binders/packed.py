"""Weights transformers 5 packs on load: MoE experts in 3-D parameters, routers that are no nn.Linear.

transformers 5 loads Mixtral's `block_sparse_moe.experts.N.w1/w2/w3` (Qwen-MoE's
`mlp.experts.N.gate_proj/up_proj/down_proj`) into `mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I], by its checkpoint conversion mapping (library code, not
input), and saves them back one by one. Here that mapping is read as data: each stored expert
weight becomes a module role of its own, with where the loaded model keeps it (`Packed`). Only
conversions that stack experts (MergeModulelist on dim 0, then Concatenate on dim 1) and plain
renamings are understood; a base with any other conversion keeps tensors the module tree does
not know, and is refused in one line where its checkpoint is read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from adaptrix.binders.table import Packed

__all__ = [
    "PackedTable",
    "PackedWeight",
    "load_renamings",
    "packed_table",
    "packed_weights",
    "router_modules",
]

logger = logging.getLogger(__name__)

_PLAIN = re.compile(r"\^?[A-Za-z0-9_.]+")
_STACKING = (("MergeModulelist", 0), ("Concatenate", 1))


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """One stored weight (a checkpoint module's name) and where the loaded model keeps it."""

    name: str  # the checkpoint module, e.g. model.layers.0.block_sparse_moe.experts.3.w1
    loaded: str  # the loaded module, e.g. model.layers.0.mlp.experts
    shape: tuple[int, int]  # the stored weight's [out, in]
    param: str
    expert: int | None
    rows: tuple[int, int]


def _conversions(model) -> list:
    """The class's own conversion mapping (transformers 5), without the legacy renamings; [] before 5."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    found = get_model_conversion_mapping(model, add_legacy=False)
    return found if any(type(c).__name__ == "WeightConverter" for c in found) else []


def load_renamings(model) -> list[tuple[str, str]]:
    """(loaded pattern, stored name) pairs that rename a loaded name back to the stored one.

    Only renamings of plain names are reversed (Mixtral's `.block_sparse_moe.` -> `.mlp.`); and
    only for classes that pack weights on load (others' renamings are read as before).
    """
    pairs = []
    for conversion in _conversions(model):
        if type(conversion).__name__ != "WeightRenaming":
            continue
        sources, targets = conversion.source_patterns, conversion.target_patterns
        if len(sources) == 1 and len(targets) == 1 and _PLAIN.fullmatch(sources[0] + targets[0]):
            anchor = "^" if targets[0].startswith("^") else ""
            pairs.append((anchor + re.escape(targets[0].lstrip("^")), sources[0].lstrip("^")))
    return pairs


def packed_weights(model, saved: Callable[[str], str]) -> list[PackedWeight]:
    """Every stored expert weight the model's conversions stack into a 3-D parameter."""
    found = []
    params = dict(model.named_parameters())
    for conversion in _conversions(model):
        operations = getattr(conversion, "operations", None) or ()
        steps = tuple((type(op).__name__, getattr(op, "dim", None)) for op in operations)
        if type(conversion).__name__ != "WeightConverter" or steps not in (_STACKING[:1], _STACKING):
            continue
        sources, (target,) = conversion.source_patterns, conversion.target_patterns
        if any(s.count("*") != 1 or not s.endswith(".weight") for s in sources):
            continue
        for name, param in params.items():
            if not name.endswith(target) or param.dim() != 3 or param.shape[1] % len(sources):
                continue
            experts, rows, cols = param.shape[0], param.shape[1] // len(sources), param.shape[2]
            head, loaded = name[: -len(target)], name.rpartition(".")[0]
            for expert in range(experts):
                for number, source in enumerate(sources):
                    stored = saved(head + source.replace("*", str(expert))).removesuffix(".weight")
                    span = (number * rows, (number + 1) * rows)
                    found.append(PackedWeight(stored, loaded, (rows, cols), name.rpartition(".")[2],
                                              expert, span))  # fmt: skip
    return found


def router_modules(model, layout: Callable) -> list[tuple[str, tuple[int, int]]]:
    """In a model that packs weights: its modules with a 2-D `weight` but no Linear layout (routers)."""
    if not _conversions(model):
        return []
    found = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and layout(module) is None:
            found.append((name, tuple(weight.shape)))
    return found


@dataclass(frozen=True, slots=True)
class PackedTable:
    """What the tree binder adds for packed weights: layer modules, aliases, packed parameters, tensors."""

    layer_modules: dict
    layer_aliases: dict[str, str]
    packed_params: dict[str, tuple[tuple[str, tuple[int, ...]], ...]]
    tensors: frozenset[str]


def packed_table(model, saved: Callable[[str], str], layout: Callable, stack: str | None) -> PackedTable:
    """The layer modules of every packed weight and router in `stack` (the loaded layer stack's name)."""
    from adaptrix.binders.table import Layout, Module

    modules, aliases, params, tensors = {}, {}, {}, set()
    if stack is None:
        return PackedTable(modules, aliases, params, frozenset())
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    stored_stack = saved(stack)

    def in_layer(name: str, stacked: str) -> str | None:
        return name.removeprefix(stacked + ".").partition(".")[2] if name.startswith(stacked + ".") else None

    entries = [(w.name, w.loaded, w.shape, w.param, w.expert, w.rows) for w in packed_weights(model, saved)]
    entries += [(saved(name), name, shape, "weight", None, (0, shape[0]))
                for name, shape in router_modules(model, layout)]  # fmt: skip
    for stored, loaded, shape, param, expert, rows in entries:
        key, loaded_key = in_layer(stored, stored_stack), in_layer(loaded, stack)
        if key is None or loaded_key is None:
            continue
        packed = Packed(loaded_key, param, expert, rows)
        modules[key] = Module((key,), Layout.LINEAR, shape=shape, packed=packed)
        if expert is None and loaded_key != key:
            aliases[loaded_key] = key
        owner = model.get_submodule(loaded)
        params[loaded_key] = tuple((n, tuple(p.shape)) for n, p in owner.named_parameters(recurse=False))
        for name in (f"{stored}.weight", f"{loaded}.{param}"):  # stored one by one, or packed as loaded
            tensors.update({name, name.removeprefix(prefix)})
    return PackedTable(modules, aliases, params, frozenset(tensors))
