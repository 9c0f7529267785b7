"""Bottlenecks in merged weights: the linear ones fold exactly into the projection they follow.

The maths is `adaptrix.lowering.bottleneck_fold` (shared with the fuse-hybrid pass): a linear,
sequential, norm-free bottleneck becomes a LowRank pair A = D W, B = U (and a bias delta) on
the projection it reads, counting the LoRA and bias deltas at that site. Anything else is not a
change of weights: it is refused, naming the sites.
"""

from __future__ import annotations

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR, Bottleneck, Op, Site
from adaptrix.lowering.bottleneck_fold import fold_bottleneck, why_not_foldable

__all__ = ["fold_bottlenecks", "why_not_foldable"]


def fold_bottlenecks(ir: AdapterIR, base: Checkpoint) -> AdapterIR:
    """The IR with every bottleneck folded into LowRank + Bias ops; one that cannot be is an error."""
    by_site = ir.by_site()
    refused = [
        (site, why)
        for site, op in ir
        if isinstance(op, Bottleneck) and (why := why_not_foldable(op, _beside(by_site[site], op)))
    ]
    if refused:
        reasons = sorted({why for _, why in refused})
        raise UnsupportedError(
            f"bottleneck adapters at {_sites(s for s, _ in refused)} cannot be merged into weights "
            f"({'; '.join(reasons)})",
            fix="use --target hooks (unmerged) or onnx-cpu / onnx-cuda (bottlenecks as graph nodes)",
        )
    ops: list[tuple[Site, Op]] = []
    for site, op in ir:
        if isinstance(op, Bottleneck):
            parts = fold_bottleneck(site, op, base, _beside(by_site[site], op))
            ops.extend((site, part) for part in parts)
        else:
            ops.append((site, op))
    return AdapterIR(tuple(ops), ir.source, ir.name)


def _beside(ops: list[Op], op: Bottleneck) -> list[Op]:
    """The other ops at a bottleneck's site (it reads their output)."""
    return [other for other in ops if other is not op]


def _sites(sites) -> str:
    names = [str(s) for s in sites]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
