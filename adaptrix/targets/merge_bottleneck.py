"""Bottlenecks in merged weights: the linear ones fold exactly into the projection they follow.

A sequential bottleneck with the identity activation and no layer norm of its own, that reads
the block's output h (not original_ln_before, not parallel) and hands its result to the layer's
own residual and norm (original_ln_after), computes h' = h + s (U (D h + bd) + bu). With
h = W x + b from the projection (o_proj / down_proj, BERT's dense):

    W' = W + s U (D W)          a LowRank with A = D W [size, in], B = U [out, size], scale s
    b' = b + s (U (D b + bd) + bu)

A module without a bias can take the second line only when it is zero. Anything else is not a
change of weights: it is refused, naming the sites.
"""

from __future__ import annotations

import torch

from adaptrix.toolchain.checkpoint import Checkpoint
from adaptrix.toolchain.errors import UnsupportedError
from adaptrix.toolchain.ir import AdapterIR, Bias, Bottleneck, LazyTensor, LowRank, Op, Site

__all__ = ["fold_bottlenecks", "why_not_foldable"]


def why_not_foldable(op: Bottleneck) -> str | None:
    """Why a bottleneck cannot become a weight delta, or None when it can."""
    if op.act.lower() != "linear":
        return f"its activation {op.act} is nonlinear"
    if op.ln_before is not None or op.ln_after is not None:
        return "it has a layer norm of its own"
    if op.parallel:
        return "it is parallel: it reads the block's input residual stream, not the projection's output"
    if op.original_ln_before:
        return "it reads the residual stream after the block (original_ln_before)"
    if not op.original_ln_after:
        return "it replaces the layer's residual and norm (original_ln_after false)"
    return None


def fold_bottlenecks(ir: AdapterIR, base: Checkpoint) -> AdapterIR:
    """The IR with every bottleneck folded into LowRank + Bias ops; one that cannot be is an error."""
    crowded = {site for site, ops in ir.by_site().items() if len(ops) > 1}
    refused = [
        (site, why) for site, op in ir if isinstance(op, Bottleneck) and (why := _why(op, site, crowded))
    ]
    if refused:
        reasons = sorted({why for _, why in refused})
        raise UnsupportedError(
            f"bottleneck adapters at {_sites(s for s, _ in refused)} cannot be merged into weights "
            f"({'; '.join(reasons)})",
            fix="use --target hooks, which runs bottlenecks unmerged",
        )
    ops: list[tuple[Site, Op]] = []
    for site, op in ir:
        if isinstance(op, Bottleneck):
            ops.extend((site, folded) for folded in _fold(site, op, base))
        else:
            ops.append((site, op))
    return AdapterIR(tuple(ops), ir.source, ir.name)


def _why(op: Bottleneck, site: Site, crowded: set[Site]) -> str | None:
    """Why not foldable, counting other ops on the same projection (the bottleneck reads their output)."""
    if site in crowded:
        return "its projection has other ops too, whose output the bottleneck reads"
    return why_not_foldable(op)


def _sites(sites) -> str:
    names = [str(s) for s in sites]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _fold(site: Site, op: Bottleneck, base: Checkpoint) -> list[Op]:
    points = base.binder.bottleneck_points[str(op.block)]
    module = next(
        name.rpartition(".")[0]
        for name in base.tensors
        if (p := base.binder.resolve(name.rpartition(".")[0])) is not None
        and p.layer == site.layer
        and p.key == points.projection
        and name.endswith(".weight")
    )
    weight_name, bias_name = f"{module}.weight", f"{module}.bias"
    has_bias = bias_name in base.tensors
    out_rows, in_cols = base.tensors[weight_name].shape
    down, up = op.down, op.up

    def a_loader() -> torch.Tensor:
        return down.load() @ base.read(weight_name).to(torch.float32)

    def bias_loader() -> torch.Tensor:
        inner = torch.zeros(op.size) if op.down_bias is None else op.down_bias.load()
        if has_bias:
            inner = inner + down.load() @ base.read(bias_name).to(torch.float32)
        outer = up.load() @ inner
        if op.up_bias is not None:
            outer = outer + op.up_bias.load()
        return outer * op.scale

    a = LazyTensor((op.size, in_cols), f"{down.origin} @ {weight_name}", a_loader)
    folded: list[Op] = [LowRank(a, up, op.scale)]
    bias = LazyTensor((out_rows,), f"bias of {down.origin} and {up.origin}", bias_loader)
    if has_bias:
        folded.append(Bias(bias))
    elif bool(bias.load().abs().max() > 0):
        raise UnsupportedError(
            f"{site}: the identity bottleneck's biases change the output of {module}, which has no bias "
            "to fold them into",
            fix="use --target hooks, which runs bottlenecks unmerged",
        )
    return folded
