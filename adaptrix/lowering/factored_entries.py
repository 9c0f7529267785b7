"""The hooks target's part for LoHa / LoKr (a LoRA pair or a dense delta) and IA3 (scale vectors).

A module's `Factored` ops become LoRA pairs, their exact low-rank forms, where those hold fewer
numbers than one dense delta (rank * (out + in) < out * in, the ranks of all its Factored ops
together); they then join the module's LoRA pair, concatenated along the rank with each scale
folded into its B. Otherwise they become one dense delta, computed here once, stored [in, out] so
that the runtime adds x @ dense to the output. Either way the delta is added before IA3's scales.
A module's `Scale` ops become one output vector (fused roles' rows put back in place, 1 where a
role has none) and one input vector (the input is shared by every role of a fused module, so they
must all scale it alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.factored_low_rank import with_low_rank_forms
from adaptrix.ir.values import Factored, LowRank, Op, Scale

__all__ = ["compact_factored", "dense_delta", "input_scale", "output_scale"]

RoleOps = tuple[tuple[Op, ...], ...]


def _where(rows: torch.Tensor | None) -> slice | torch.Tensor:
    return slice(None) if rows is None else rows


def compact_factored(role_ops: RoleOps, out: int, inner: int) -> RoleOps:
    """The module's ops, its Factored ops as LowRank where that is smaller than a dense [out, in]."""
    flat = [op for ops in role_ops for op in ops]
    if not any(isinstance(op, Factored) for op in flat):
        return role_ops
    forms = with_low_rank_forms(flat)
    # Roles made from the same factors share one A: the writer keeps them as one group.
    groups = {(id(new.a), new.scale): new.rank for old, new in zip(flat, forms, strict=True)
              if isinstance(old, Factored) and isinstance(new, LowRank)}  # fmt: skip
    if sum(groups.values()) * (out + inner) >= out * inner:
        return role_ops
    found, start = [], 0
    for ops in role_ops:
        found.append(tuple(forms[start : start + len(ops)]))
        start += len(ops)
    return tuple(found)


def dense_delta(
    role_ops: Sequence[Sequence[Op]], rows: list | None, shape: tuple[int, int]
) -> torch.Tensor | None:
    """The module's Factored deltas as one canonical [out, in] delta (None when it has none)."""
    found = [(r, op) for r, ops in zip(rows or [None], role_ops, strict=True) for op in ops
             if isinstance(op, Factored)]  # fmt: skip
    if not found:
        return None
    delta = torch.zeros(shape)
    for r, op in found:
        delta[_where(r)] += op.delta()
    return delta


def output_scale(role_ops: Sequence[Sequence[Op]], rows: list | None, out: int) -> torch.Tensor | None:
    """The product of the module's output Scale ops, per output feature (None when it has none)."""
    found = [(r, op) for r, ops in zip(rows or [None], role_ops, strict=True) for op in ops
             if isinstance(op, Scale) and op.axis == "out"]  # fmt: skip
    if not found:
        return None
    vector = torch.ones(out)
    for r, op in found:
        vector[_where(r)] *= op.vector.load()
    return vector


def input_scale(role_ops: Sequence[Sequence[Op]], in_features: int) -> torch.Tensor | None:
    """The module's input Scale (None when it has none); fused roles must scale the input alike."""
    per_role = []
    for ops in role_ops:
        vector = None
        for op in ops:
            if isinstance(op, Scale) and op.axis == "in":
                vector = op.vector.load() if vector is None else vector * op.vector.load()
        per_role.append(vector)
    if all(v is None for v in per_role):
        return None
    first = per_role[0]
    if any(v is None or not torch.equal(v, first) for v in per_role):
        raise UnsupportedError(
            "scales the input of some roles of a fused module differently from others, which a hook "
            "on the shared input cannot do",
            fix="use --target merged",
        )
    if first.shape != (in_features,):
        raise UnsupportedError(f"has an input scale of {first.shape[0]} features for {in_features} inputs")
    return first
