"""Lowering AIR onto a base: roles found in the base's binder, shapes equal to the base's.

AIR is role-based, so an adapter applies to any base whose architecture has its roles and whose
dimensions match, whatever family it was trained on. Other sizes and depths are an error here: the
`project` and `redistribute` passes carry an adapter there first, and the pipeline fits their
result onto the base with `fit_ir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adaptrix.frontends.air.adapter import AirAdapter
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import AdapterIR, Bias, DoRA, LazyTensor, LowRank, Op, Replace, Role, Site
from adaptrix.lowering.sites import base_sites

__all__ = ["fit_ir", "lower_air"]

logger = logging.getLogger(__name__)

_ATTENTION = frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O})
_FIX = "use a base with the adapter's dimensions, or add `--pass project` to carry the deltas to the base's"


def lower_air(adapter: AirAdapter, base: Checkpoint) -> AdapterIR:
    """The AIR adapter's IR on `base`: each site must exist there with the same shapes."""
    return fit_ir(adapter.ir(), base, adapter.path)


def fit_ir(ir: AdapterIR, base: Checkpoint, path: Path) -> AdapterIR:
    """`ir` (in its source model's dimensions) as an IR of `base`, or an error naming `path` and the fix.

    Every site must exist in the base with the shapes the base needs, and attention deltas need
    the same heads; an adapter shallower than the base keeps its ops on their layers (a warning).
    """
    sites = base_sites(base)
    _check_heads(ir, base, path)
    _check_stacks(ir, base, path)
    if ir.source.num_layers != base.source.num_layers:
        ours, theirs = ir.source.num_layers, base.source.num_layers
        logger.warning("%s was made for %d layers, the base %s has %d: ops stay on their layers "
                       "(`--pass redistribute` spreads them over the base's depth)",
                       path, ours, base.path, theirs)  # fmt: skip
    for site, op in ir.ops:
        _check_site(path, base, sites, site, op)
    return AdapterIR(ir.ops, base.source, name=ir.name)


def _check_heads(ir: AdapterIR, base: Checkpoint, path: Path) -> None:
    """Attention deltas keep their meaning only with the same heads, kv heads and head size."""
    attention = [site for site, _ in ir.ops if site.role in _ATTENTION]
    ours, theirs = ir.source, base.source
    layout = ("num_heads", "num_kv_heads", "head_dim")
    if attention and any(getattr(ours, f) != getattr(theirs, f) for f in layout):
        raise BadInputError(
            f"{attention[0]}: the adapter's attention has {ours.num_heads} heads ({ours.num_kv_heads} kv) of "
            f"{ours.head_dim}, the base {base.path} has {theirs.num_heads} ({theirs.num_kv_heads} kv) "
            f"of {theirs.head_dim}",
            path=path,
            fix=_FIX,
        )


def _check_stacks(ir: AdapterIR, base: Checkpoint, path: Path) -> None:
    """An encoder-decoder's layers mean encoder or decoder layers only with the same split of them."""
    ours, theirs = ir.source, base.source
    if (ours.decoder_start, ours.num_layers) != (theirs.decoder_start, theirs.num_layers) and (
        ours.decoder_start is not None or theirs.decoder_start is not None
    ):

        def split(source) -> str:
            start = source.decoder_start
            if start is None:
                return f"{source.num_layers} layers in one stack"
            return f"{start} encoder and {source.num_layers - start} decoder layers"

        raise BadInputError(
            f"was made for {split(ours)}, the base {base.path} has {split(theirs)}",
            path=path,
            fix="use a base with the adapter's encoder and decoder depths",
        )


def _check_site(path: Path, base: Checkpoint, sites: dict, site: Site, op: Op) -> None:
    if site.layer is not None and site.layer >= base.source.num_layers:
        raise BadInputError(
            f"has ops at layer {site.layer}, but the base {base.path} has {base.source.num_layers} layers",
            path=path,
            fix="use a base as deep as the adapter's, or add `--pass redistribute` to move its layers",
        )
    there = sites.get(site)
    if there is None:
        raise BadInputError(
            f"has ops at {site}, but the {base.binder.name} base {base.path} has no module for it",
            path=path,
            fix="use a base whose architecture has that role, or drop those ops",
        )
    for part, tensor, expected in _shapes(op, there.shape):
        if tensor.shape != expected:
            raise BadInputError(
                f"{site}: {part} is {list(tensor.shape)}, but the base's {there.module} needs "
                f"{list(expected)} (its [out, in] is {list(there.shape)})",
                path=path,
                fix=_FIX,
            )
    needed = {"bias"} if isinstance(op, Bias) else set(op.tensors) if isinstance(op, Replace) else set()
    if missing := sorted(needed - there.params):
        raise BadInputError(
            f"{site}: changes {there.module}.{missing[0]}, which the base {base.path} does not have",
            path=path,
            fix="use a base whose modules have that parameter",
        )


def _shapes(op: Op, shape: tuple[int, int]) -> list[tuple[str, LazyTensor, tuple[int, ...]]]:
    """(what, tensor, the shape the base needs) for each tensor of an op."""
    out_rows, in_cols = shape
    if isinstance(op, LowRank | DoRA):
        low_rank = op.low_rank if isinstance(op, DoRA) else op
        found = [("A", low_rank.a, (low_rank.rank, in_cols)), ("B", low_rank.b, (out_rows, low_rank.rank))]
        if isinstance(op, DoRA):
            found.append(("the magnitude", op.magnitude, (in_cols if op.per_column else out_rows,)))
        return found
    if isinstance(op, Bias):
        return [("the bias delta", op.delta, (out_rows,))]
    vector = (out_rows,)
    return [
        (f"the new {param}", tensor, vector if param == "bias" or in_cols == 0 else (out_rows, in_cols))
        for param, tensor in op.tensors.items()
        if param in ("weight", "bias")
    ]
