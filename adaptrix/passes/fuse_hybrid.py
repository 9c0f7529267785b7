"""fuse-hybrid: a LoRA adapter and bottleneck adapters joined into one IR, linear bottlenecks folded."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError, site_context
from adaptrix.ir.values import AdapterIR, Bias, Bottleneck, LowRank, Op, Site, site_order
from adaptrix.lowering.bottleneck_fold import fold_bottleneck, why_not_foldable
from adaptrix.passes.base import PassResult
from adaptrix.passes.combine import stack_weighted

__all__ = ["CONFLICT_CHOICES", "FuseHybridOptions", "fuse_hybrid"]

CONFLICT_CHOICES = ("error", "add", "first", "last")
_ADDS = (LowRank, Bias)  # kinds whose ops add up exactly (stacked factors, summed bias deltas)


@dataclass(frozen=True, slots=True)
class FuseHybridOptions:
    """fold: fold linear, norm-free bottlenecks into LoRA deltas; on_conflict: error|add|first|last."""

    fold: bool = True
    on_conflict: str = "error"

    def __post_init__(self) -> None:
        """A known conflict rule."""
        if self.on_conflict not in CONFLICT_CHOICES:
            choices = ", ".join(CONFLICT_CHOICES)
            raise ValueError(f"option on_conflict={self.on_conflict!r} is not one of {choices}")


def fuse_hybrid(irs: Sequence[AdapterIR], options: FuseHybridOptions, base: Checkpoint) -> PassResult:
    """Join adapters (a PEFT LoRA, AdapterHub bottlenecks, in the order given) into one IR.

    Usage: `adaptrix compile LORA BOTTLENECK --base B --target hooks -o OUT --pass fuse-hybrid`.
    Ops of different kinds at one site stay side by side (a bottleneck reads the output of the
    LoRA on its projection). Two inputs with ops of the same kind at one site are an error
    unless `on_conflict` says how to join them: `add` (LoRA factors stacked, bias deltas summed:
    exact; refused for kinds that do not add), `first` or `last` (that input's ops kept, the
    others' dropped and reported). With `fold` (default), a bottleneck that is linear in its
    projection's output (identity activation, no layer norm, sequential, residual and norm
    kept) becomes an exact LowRank pair A = D W, B = U (and a bias delta) on that projection;
    every other bottleneck stays an op with the same tensors, so shared weights stay shared.
    `fold=false` keeps them all and marks them so that no target folds them (merged refuses).
    """
    _check_same_source(irs)
    per_input, gathered = [], {}
    for index, ir in enumerate(irs):
        kinds: dict[str, set[Site]] = {}
        for site, op in ir:
            kinds.setdefault(type(op).__name__, set()).add(site)
            gathered.setdefault(site, {}).setdefault(type(op).__name__, []).append((index, op))
        counts = {kind: len(sites) for kind, sites in sorted(kinds.items())}
        per_input.append({"name": ir.name, "sites": counts})
    names = [ir.name for ir in irs]
    ops, conflicts = [], []
    for site in sorted(gathered, key=site_order):
        for kind, found in gathered[site].items():
            with site_context(site):
                kept, record = _resolve(site, kind, found, names, options.on_conflict)
            ops.extend((site, op) for op in kept)
            if record:
                conflicts.append(record)
    ops, folded, kept_ops = _fold_all(ops, base, options.fold)
    report = {"inputs": per_input, "folded": folded, "bottlenecks_kept": kept_ops, "conflicts": conflicts}
    return PassResult(AdapterIR(tuple(ops), irs[0].source, "+".join(names)), True, report)


def _resolve(site: Site, kind: str, found: list[tuple[int, Op]], names: list[str], rule: str):
    """The ops of one kind at one site, joined by `rule` when several inputs put them there."""
    inputs = sorted({index for index, _ in found})
    if len(inputs) < 2:
        return [op for _, op in found], None
    who = " and ".join(names[i] for i in inputs)
    if rule == "error":
        raise BadInputError(
            f"{who} both put a {kind} op here",
            fix="say how to join them: --pass fuse-hybrid:on_conflict=add|first|last",
        )
    record = {"site": str(site), "kind": kind, "inputs": [names[i] for i in inputs], "resolved": rule}
    if rule in ("first", "last"):
        chosen = inputs[0] if rule == "first" else inputs[-1]
        record["kept"] = names[chosen]
        return [op for index, op in found if index == chosen], record
    if kind not in {k.__name__ for k in _ADDS}:
        raise UnsupportedError(
            f"{who} both put a {kind} op here, and {kind} ops do not add (only LoRA factors and bias "
            "deltas do)",
            fix="use on_conflict=first or on_conflict=last, or compile the adapters one at a time",
        )
    low_rank, biases = stack_weighted(site, [(1.0, op) for _, op in found], f"fuse-hybrid.{site}")
    if low_rank is not None:
        record["rank"] = low_rank.rank
    return ([low_rank] if low_rank else []) + biases, record


def _fold_all(ops: list[tuple[Site, Op]], base: Checkpoint, fold: bool):
    """Fold each foldable bottleneck into LowRank + Bias ops; report what folded and what stayed."""
    by_site: dict[Site, list[Op]] = {}
    for site, op in ops:
        by_site.setdefault(site, []).append(op)
    result, folded, kept = [], [], []
    for site, op in ops:
        if not isinstance(op, Bottleneck):
            result.append((site, op))
            continue
        beside = [other for other in by_site[site] if other is not op]
        if not fold:  # the same tensors (shared ones stay shared), marked so no target folds them
            op = dataclasses.replace(op, foldable=False)
        why = why_not_foldable(op, beside)
        parts = None
        if why is None:
            with site_context(site):
                try:
                    parts = fold_bottleneck(site, op, base, beside)
                except UnsupportedError as exc:  # biases a bias-free projection cannot take
                    why = str(exc)
        if parts is None:
            result.append((site, op))
            kept.append({"site": str(site), "op": op.label, "shared": op.shared, "why": why})
            continue
        result.extend((site, part) for part in parts)
        entry = {"site": str(site), "rank": op.size, "exact": True, "bias": len(parts) > 1}
        if op.shared:  # A = D W differs per layer: each layer stores its own pair
            entry.update(shared=op.shared, stored_per_layer=True)
        folded.append(entry)
    return result, folded, kept


def _check_same_source(irs: Sequence[AdapterIR]) -> None:
    """All inputs must be made for the same model dimensions."""
    first = irs[0].source
    for ir in irs[1:]:
        if ir.source != first:
            raise BadInputError(f"{ir.name} was made for {ir.source.as_dict()}, {irs[0].name} for "
                                f"{first.as_dict()}", fix="fuse adapters made for the same base")  # fmt: skip
