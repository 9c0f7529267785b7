"""The rows of an inspect table for an adapter lowered into the IR: one per site and op."""

from __future__ import annotations

from adaptrix.ir.values import (
    AdapterIR,
    Bias,
    Bottleneck,
    DoRA,
    Factored,
    LazyTensor,
    LowRank,
    Op,
    Replace,
    Scale,
    site_order,
)

__all__ = ["bottleneck_row", "site_rows"]

_KINDS = {LowRank: "lora", DoRA: "dora", Bias: "bias", Replace: "replace", Scale: "ia3"}


def site_rows(ir: AdapterIR) -> tuple[list[dict], dict[int, LazyTensor]]:
    """One row per (site, op) of an IR, and its distinct tensors by identity."""
    rows, unique = [], {}
    for site, op in sorted(ir, key=lambda pair: site_order(pair[0])):
        tensors = _op_tensors(op)
        unique.update((id(t), t) for t in tensors)
        low_rank = op.low_rank if isinstance(op, DoRA) else op
        if isinstance(op, Bottleneck):
            rows.append({"layer": site.layer, "role": str(site.role), **bottleneck_row(op, tensors)})
            continue
        rows.append(
            {
                "layer": site.layer,
                "role": str(site.role),
                "op": op.kind if isinstance(op, Factored) else _KINDS[type(op)],
                "rank": low_rank.rank if isinstance(low_rank, LowRank | Factored) else None,
                "scale": low_rank.scale if isinstance(low_rank, LowRank | Factored) else None,
                **({"axis": op.axis} if isinstance(op, Scale) else {}),
                "parameters": sum(t.numel for t in tensors),
                "bytes": sum(t.nbytes for t in tensors),
            }
        )
    return rows, unique


def bottleneck_row(op: Bottleneck, tensors: list[LazyTensor]) -> dict:
    """A bottleneck's row: size, activation, placement, options, shared group, parameters, bytes."""
    return {
        "op": "bottleneck",
        "size": op.size,
        "act": op.act,
        "placement": f"{'parallel to' if op.parallel else 'after'} {op.block}",
        "scale": op.scale,
        "layer_norms": [name for name, norm in (("before", op.ln_before), ("after", op.ln_after)) if norm],
        "shared": op.shared,
        "parameters": sum(t.numel for t in tensors),
        "bytes": sum(t.nbytes for t in tensors),
    }


def _op_tensors(op: Op) -> list[LazyTensor]:
    if isinstance(op, Bottleneck):
        return list(op.tensors().values())
    if isinstance(op, LowRank):
        return [op.a, op.b]
    if isinstance(op, DoRA):
        return [op.low_rank.a, op.low_rank.b, op.magnitude]
    if isinstance(op, Bias):
        return [op.delta]
    if isinstance(op, Factored):
        return list(op.factors.values())
    if isinstance(op, Scale):
        return [op.vector]
    return list(op.tensors.values())
