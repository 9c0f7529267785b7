"""A module's deltas as one low-rank pair and its IA3 vectors, in the module's own layout.

What the ONNX targets take from an adapter: the unmerged graph's LoRA inputs and IA3 vectors,
and the merged patcher's low-rank products; built by the hooks target's entry builder, so the
fused modules' roles are put back together exactly as in a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptrix.binders.table import Layout, Placement
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.bottleneck import refuse_bottlenecks
from adaptrix.ir.errors import AdaptrixError, UnsupportedError
from adaptrix.ir.values import AdapterIR, LowRank, Scale
from adaptrix.lowering.module_entries import EntryBuilder
from adaptrix.lowering.touched import touched_modules

__all__ = ["LowRankPair", "ModuleScales", "low_rank_pairs", "module_scales"]


@dataclass(frozen=True, slots=True)
class LowRankPair:
    """A module's whole low-rank delta in its own layout: output += (x @ down) @ up."""

    placement: Placement
    weight: str  # the stored tensor holding the module's weight
    down: torch.Tensor  # [in, r]
    up: torch.Tensor  # [r, out], every scale folded in


def low_rank_pairs(
    ir: AdapterIR, base: Checkpoint, dtype: torch.dtype, strict: bool = True, keep_scales: bool = False
) -> list[LowRankPair]:
    """One low-rank pair per touched module; any other kind of op is an error (skipped if not strict).

    With `keep_scales`, IA3's Scale ops are no error: they are left to `module_scales`.
    """
    refuse_bottlenecks(ir, "bottleneck adapters are not low-rank pairs",
                       fix="compile without --unmerged, or use --target hooks")  # fmt: skip
    kept = (LowRank, Scale) if keep_scales else (LowRank,)
    pairs = []
    for module in touched_modules(ir, base):
        name = module.placement.name
        other = {getattr(op, "label", type(op).__name__) for ops in module.role_ops for op in ops
                 if type(op) not in kept}  # fmt: skip
        if module.placement.module.layout not in (Layout.LINEAR, Layout.CONV1D):
            other.add("LoRA on an embedding")
        if other and not strict:
            continue
        if other:
            raise UnsupportedError(f"{name}: {', '.join(sorted(other))} cannot stay unmerged here",
                                   fix="compile without --unmerged, or use --target hooks")  # fmt: skip
        low_rank = [[op for op in ops if type(op) is LowRank] for ops in module.role_ops]
        if not any(low_rank):  # IA3 only
            continue
        builder = EntryBuilder(module, base, dtype)
        lora = builder.lora(low_rank)
        pairs.append(LowRankPair(module.placement, module.weight, builder.tensors[lora["down"]],
                                 builder.tensors[lora["up"]]))  # fmt: skip
    return pairs


@dataclass(frozen=True, slots=True)
class ModuleScales:
    """A module's IA3 vectors in its own layout: output *= out (every row of a fused module), input *= in."""

    placement: Placement
    weight: str  # the stored tensor holding the module's weight
    bias: str | None  # the module's stored bias, which an output scale multiplies too
    out: torch.Tensor | None  # [out_features], float32; None when the output is not scaled
    in_: torch.Tensor | None  # [in_features], float32; None when the input is not scaled


def module_scales(ir: AdapterIR, base: Checkpoint) -> list[ModuleScales]:
    """The IA3 vectors of each module with Scale ops, as the bundle holds them (fused rows put back)."""
    found = []
    for module in touched_modules(ir, base):
        if not any(isinstance(op, Scale) for ops in module.role_ops for op in ops):
            continue
        name = module.placement.name
        builder = EntryBuilder(module, base, torch.float32)
        try:
            keys = builder.kinds()
        except AdaptrixError as exc:
            raise exc.with_context(name) from None
        out, in_ = (builder.tensors[keys[key]] if key in keys else None for key in ("scale_out", "scale_in"))
        bias = f"{name}.bias" if f"{name}.bias" in base.tensors else None
        found.append(ModuleScales(module.placement, module.weight, bias, out, in_))
    return found
