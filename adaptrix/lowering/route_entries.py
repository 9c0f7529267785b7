"""A routed module's bundle entry: each adapter's low-rank pair in the module's layout, and the router.

The hooks target writes it; the ONNX target reads the same pairs for its routed graph. A fused
module's roles are put back together per adapter, as for a single adapter's LoRA pair.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaptrix.binders.table import Layout
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.route import Routed
from adaptrix.lowering.peft_modules import grouped_pairs

__all__ = ["RoutedPairs", "route_entry", "routed_modules", "routed_pairs"]


class RoutedPairs:
    """A module's router: adapters, options, prototypes [E, in] and one (down [in, r], up [r, out]) each."""

    def __init__(self, op: Routed, prototypes: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.op, self.prototypes, self.pairs = op, prototypes, pairs


def routed_pairs(role_ops, rows, out_rows: int, layout: Layout, name: str) -> RoutedPairs | None:
    """The module's routed ops as one router; None when it has none. Mixed with other ops: refused."""
    routed = [[op for op in ops if isinstance(op, Routed)] for ops in role_ops]
    if not any(routed):
        return None
    if any(len(ops) != 1 for ops in routed) or any(len(ops) != 1 for ops in role_ops if ops):
        raise UnsupportedError(f"{name}: a routed module takes one routed op at each of its roles, and "
                               "nothing else", fix="route adapters of the same target modules")  # fmt: skip
    if layout not in (Layout.LINEAR, Layout.CONV1D):
        raise UnsupportedError(f"{name}: a {layout} module cannot be routed (Arrow routes linear layers)",
                               fix="route adapters without LoRA on embeddings or norms")  # fmt: skip
    ops = [ops[0] for ops in routed]
    first = ops[0]
    if any(op.prototypes is not first.prototypes for op in ops):
        raise UnsupportedError(f"{name}: the roles of this fused module were routed apart",
                               fix="route the adapters with --pass route")  # fmt: skip
    pairs = []
    for index in range(len(first.adapters)):
        groups = grouped_pairs([[op.experts[index]] for op in ops], rows, out_rows)
        a = torch.cat([down for down, _, _ in groups])
        b = torch.cat([up * scale for _, up, scale in groups], 1)  # each scale folded into its B
        pairs.append((a.T, b.T))
    return RoutedPairs(first, first.prototypes.load(), pairs)


def route_entry(routed: RoutedPairs, put: Callable[[str, torch.Tensor], str]) -> dict:
    """The bundle entry's `route` section; `put(suffix, tensor)` stores a tensor and returns its key."""
    op = routed.op
    experts = [
        {
            "rank": down.shape[1],
            "down": put(f"route.{i}.lora_down", down),
            "up": put(f"route.{i}.lora_up", up),
        }
        for i, (down, up) in enumerate(routed.pairs)
    ]
    prototypes = put("route.prototypes", routed.prototypes)
    return {**op.options(), "adapters": list(op.adapters), "prototypes": prototypes, "experts": experts}


def routed_modules(ir, base) -> list[tuple[object, str, RoutedPairs]]:
    """Each routed module of the base: (placement, weight tensor name, its router), in checkpoint order."""
    from adaptrix.binders.table import split_rows
    from adaptrix.lowering.touched import touched_modules

    found = []
    for module in touched_modules(ir, base):
        placement = module.placement
        layout = placement.module.layout
        shape = base.tensors[module.weight].shape
        out_rows = shape[1] if layout is Layout.CONV1D else shape[0]
        rows = split_rows(placement.module.split, base.source)
        routed = routed_pairs(module.role_ops, rows, out_rows, layout, placement.name)
        if routed is None:
            raise UnsupportedError(f"{placement.name}: a routed adapter has a module that is not routed",
                                   fix="route with --pass route only")  # fmt: skip
        found.append((placement, module.weight, routed))
    return found
