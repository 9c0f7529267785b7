"""redistribute: move an adapter's per-layer deltas onto other layers (another depth, or chosen layers).

A mixing matrix W [K targets, S source layers] over relative depth sends each source layer's delta
to the target layers near it; every column sums to 1, so each role's total delta is conserved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError, site_context
from adaptrix.ir.values import AdapterIR, Bias, DoRA, Factored, LowRank, Op, Role, Site, site_order
from adaptrix.passes.base import PassResult
from adaptrix.passes.combine import stack_weighted

__all__ = ["METHODS", "RedistributeOptions", "mixing_matrix", "redistribute"]

METHODS = ("linear", "nearest")


@dataclass(frozen=True, slots=True)
class RedistributeOptions:
    """layers: the target layers (default all of depth); depth: the target depth (default the base's).

    method: linear (split between the two nearest target layers) or nearest (all to the nearest).
    """

    layers: tuple[int, ...] | None = None
    depth: int | None = None
    method: str = "linear"

    def __post_init__(self) -> None:
        """A known method, a depth of at least 1, distinct layers inside it."""
        if self.method not in METHODS:
            raise ValueError(f"option method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"option depth={self.depth} must be at least 1")
        if self.layers is None:
            return
        if not self.layers:
            raise ValueError("option layers needs at least one layer")
        if min(self.layers) < 0:
            raise ValueError(f"option layers has a negative layer {min(self.layers)}")
        repeated = sorted({layer for layer in self.layers if self.layers.count(layer) > 1})
        if repeated:
            raise ValueError(f"option layers names layer {repeated[0]} twice")
        if self.depth is not None and max(self.layers) >= self.depth:
            raise ValueError(f"option layers has layer {max(self.layers)}, outside depth={self.depth}")


def mixing_matrix(source_depth: int, targets: int, method: str) -> torch.Tensor:
    """W [targets, source_depth] (float64): where each source layer's delta goes; columns sum to 1.

    Source layer i sits at relative depth (i + 0.5) / S, target k at (k + 0.5) / K; in target
    index units source i is at x = (i + 0.5) K / S - 0.5. `linear` splits it between floor(x) and
    floor(x) + 1 (clamped at the ends), `nearest` sends it to round(x), a tie to the shallower.
    """
    weights = torch.zeros(targets, source_depth, dtype=torch.float64)
    for i in range(source_depth):
        x = Fraction((2 * i + 1) * targets - source_depth, 2 * source_depth)  # exact: K == S gives x = i
        if method == "nearest":
            weights[min(max(math.ceil(x - Fraction(1, 2)), 0), targets - 1), i] = 1.0
        elif x <= 0 or x >= targets - 1:
            weights[0 if x <= 0 else targets - 1, i] = 1.0
        else:
            low = math.floor(x)
            weights[low, i] += float(1 - (x - low))
            weights[low + 1, i] += float(x - low)
    return weights


def redistribute(ir: AdapterIR, options: RedistributeOptions, base: Checkpoint) -> PassResult:
    """Move every layer op onto the target layers by a mixing matrix over relative depth.

    Usage: `--pass redistribute:layers=3,6,9` (the adapter's layers onto those, spread by relative
    depth; as many layers as the adapter has is a pure move in order) or `--pass
    redistribute:depth=8,method=nearest` (onto all layers of depth 8; default the base's depth).
    A target site gets sum_i W[k, i] * delta_i of its role: LowRank factors are stacked exactly
    (ranks add up, scale 1), Bias deltas summed. DoRA and Replace ops are not linear and only move
    whole (weight 1, one source per target). Model-level ops stay. The report gives the matrix,
    each target site's sources, weights and rank, and the measured relative Frobenius error of
    each role's total delta (conservation: ~1e-7).
    """
    source_depth = ir.source.num_layers
    depth = options.depth or base.source.num_layers
    targets = sorted(options.layers) if options.layers is not None else list(range(depth))
    _check_targets(targets, depth, base)
    by_role = _layer_ops(ir, source_depth)
    summary = {"source_depth": source_depth, "target_depth": depth, "target_layers": targets,
               "method": options.method}  # fmt: skip
    if not by_role:
        note = "the adapter has no per-layer ops: nothing to redistribute"
        return PassResult(dataclasses.replace(ir, source=dataclasses.replace(ir.source, num_layers=depth)),
                          depth != source_depth, {**summary, "note": note})  # fmt: skip
    weights = mixing_matrix(source_depth, len(targets), options.method)
    kept = [(site, op) for site, op in ir if site.layer is None]
    ops, sites = _place(by_role, targets, weights)
    ops.sort(key=lambda pair: site_order(pair[0]))
    source = dataclasses.replace(ir.source, num_layers=depth)
    new_ir = dataclasses.replace(ir, ops=tuple(kept + ops), source=source)
    errors = {str(role): _total_error(by_role[role], new_ir, role) for role in by_role}
    identity = targets == list(range(source_depth)) and torch.equal(weights, torch.eye(source_depth).double())
    report = {**summary, "matrix": [[round(float(w), 6) for w in row] for row in weights],
              "sites": sites, "total_delta_relative_error": max(errors.values()),
              "role_relative_error": errors}  # fmt: skip
    if identity and depth == source_depth:
        return PassResult(ir, False, {**report, "note": "the target layers are the source's: nothing moves"})
    return PassResult(new_ir, True, report)


def _place(by_role: dict[Role, dict[int, list[Op]]], targets: list[int],
           weights: torch.Tensor) -> tuple[list[tuple[Site, Op]], list[dict]]:  # fmt: skip
    """The ops of every target site, and per target site its sources, weights and rank."""
    ops, sites = [], []
    for role, layers in by_role.items():
        for k, target in enumerate(targets):
            found = [(i, float(weights[k, i])) for i in sorted(layers) if weights[k, i] != 0]
            if not found:
                continue
            site = Site(target, role)
            new = _mix(site, role, found, layers)
            ops.extend((site, op) for op in new)
            rank = sum((op.low_rank if isinstance(op, DoRA) else op).rank for op in new
                       if isinstance(op, LowRank | DoRA))  # fmt: skip
            sites.append({"site": str(site), "from_layers": [i for i, _ in found],
                          "weights": [round(w, 6) for _, w in found], "rank": rank})  # fmt: skip
    return ops, sites


def _check_targets(targets: Sequence[int], depth: int, base: Checkpoint) -> None:
    """Every target layer must exist in the target depth and in the base."""
    for layer in targets:
        if layer >= depth or layer >= base.source.num_layers:
            where = f"the base {base.path}" if layer >= base.source.num_layers else f"depth={depth}"
            limit = min(depth, base.source.num_layers)
            raise BadInputError(f"target layer {layer} is outside {where} (layers 0..{limit - 1})",
                                fix=f"choose layers below {limit}")  # fmt: skip


def _layer_ops(ir: AdapterIR, source_depth: int) -> dict[Role, dict[int, list[Op]]]:
    """The per-layer ops by role and source layer; a layer outside the source's depth is an error."""
    found: dict[Role, dict[int, list[Op]]] = {}
    for site, op in ir:
        if site.layer is None:
            continue
        if site.layer >= source_depth:
            raise BadInputError(f"{ir.name} has ops at {site}, but was made for {source_depth} layers",
                                fix="fix num_layers in the adapter's source model")  # fmt: skip
        found.setdefault(site.role, {}).setdefault(site.layer, []).append(op)
    return found


def _mix(site: Site, role: Role, found: list[tuple[int, float]], layers: dict[int, list[Op]]) -> list[Op]:
    """The ops of one target site: sum of weight * the sources' ops; DoRA and Replace only as a pure move."""
    if len(found) == 1 and found[0][1] == 1.0:
        return list(layers[found[0][0]])  # a pure move: the ops themselves
    for i, weight in found:
        odd = [op for op in layers[i] if not isinstance(op, LowRank | Bias)]
        if odd:
            others = [j for j, _ in found if j != i]
            mixed = f", mixed with layers {', '.join(map(str, others))}" if others else ""
            with site_context(Site(i, role)):
                raise UnsupportedError(
                    f"a {getattr(odd[0], 'label', type(odd[0]).__name__)} op {_why(odd[0])}, so it cannot be "
                    "split or mixed across "
                    f"layers (target {site} would get {weight:.3g} of it{mixed})",
                    fix="choose as many target layers as the adapter has (a pure move), "
                    "or an adapter without DoRA and modules_to_save",
                )
    weighted = [(w, op) for i, w in found for op in layers[i]]
    with site_context(site):
        low_rank, biases = stack_weighted(site, weighted, f"redistribute.{site.layer}.{role}")
    return ([low_rank] if low_rank is not None else []) + biases


def _why(op: Op) -> str:
    """Why an op cannot be mixed: a LoHa / LoKr delta is linear but does not stack with others."""
    return "has no low-rank factors to stack" if isinstance(op, Factored) else "is not linear"


def _total_error(layers: dict[int, list[Op]], new_ir: AdapterIR, role: Role) -> float:
    """||sum of the role's deltas after - before|| / ||before||, from small Gram matrices of the factors."""
    before = [op for ops in layers.values() for op in ops]
    after = [op for site, op in new_ir if site.layer is not None and site.role == role]
    pairs = [(op, 1.0) for op in before] + [(op, -1.0) for op in after]
    difference = _frobenius_squared(pairs)
    total = _frobenius_squared([(op, 1.0) for op in before])
    return math.sqrt(max(difference, 0.0) / total) if total > 0 else math.sqrt(max(difference, 0.0))


def _frobenius_squared(pairs: list[tuple[Op, float]]) -> float:
    """||sum sign * delta||^2 over LowRank ops (trace of (B^T B)(A A^T)) plus the summed Bias deltas'."""
    low = [(op, sign) for op, sign in pairs if isinstance(op, LowRank)]
    value = 0.0
    if low:
        a = torch.cat([op.a.load().double() for op, _ in low])
        b = torch.cat([op.b.load().double() * (sign * op.scale) for op, sign in low], dim=1)
        value += float(((b.T @ b) * (a @ a.T)).sum())
    bias = [op.delta.load().double() * sign for op, sign in pairs if isinstance(op, Bias)]
    if bias:
        value += float(sum(bias).square().sum())
    return value
