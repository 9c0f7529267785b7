"""Applying IR ops to one base tensor, in float32: the arithmetic of merging."""

from __future__ import annotations

import torch

from adaptrix.toolchain.binders.table import Layout, Placement, split_rows
from adaptrix.toolchain.ir import Bias, DoRA, LowRank, Op, Replace, SourceModel

__all__ = ["apply_ops", "op_params"]

# Ops apply in this order at a site: new values first, then weight deltas, then bias deltas.
_ORDER = {Replace: 0, LowRank: 1, DoRA: 1, Bias: 2}


def op_params(op: Op) -> set[str]:
    """The parameter names (weight, bias, ...) an op changes."""
    if isinstance(op, Replace):
        return set(op.tensors)
    return {"bias"} if isinstance(op, Bias) else {"weight"}


def apply_ops(
    value: torch.Tensor,
    param: str,
    placement: Placement,
    role_ops: list[list[Op]],
    source: SourceModel,
) -> torch.Tensor:
    """The merged float32 value of one stored tensor, given the ops at each of its module's roles."""
    conv1d = placement.module.layout is Layout.CONV1D and param == "weight"
    canonical = (value.T if conv1d else value).to(torch.float32, copy=True)
    index = split_rows(placement.module.split, source)
    for i, ops in enumerate(role_ops):
        relevant = sorted((op for op in ops if param in op_params(op)), key=lambda o: _ORDER[type(o)])
        if not relevant:
            continue
        rows = None if index is None else index[i]
        part = canonical if rows is None else canonical[rows]
        for op in relevant:
            part = _apply(part, param, op)
        if rows is None:
            canonical = part
        else:
            canonical[rows] = part
    return canonical.T if conv1d else canonical


def _apply(part: torch.Tensor, param: str, op: Op) -> torch.Tensor:
    if isinstance(op, Replace):
        return op.tensors[param].load()
    if isinstance(op, Bias):
        return part + op.delta.load()
    if isinstance(op, LowRank):
        return part.addmm_(op.b.load(), op.a.load(), alpha=op.scale)
    combined = part.addmm_(op.low_rank.b.load(), op.low_rank.a.load(), alpha=op.low_rank.scale)
    norm = torch.linalg.vector_norm(combined, dim=1)
    return combined * (op.magnitude.load() / norm)[:, None]
