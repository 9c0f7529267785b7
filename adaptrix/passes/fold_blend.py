"""fold-blend: fold out = (1 - alpha) * base + alpha * adapted into the adapter's deltas, exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adaptrix.ir.errors import UnsupportedError, site_context
from adaptrix.ir.values import AdapterIR, Bias, Factored, LowRank, Op, Scale
from adaptrix.passes.base import PassResult, rebuild

__all__ = ["FoldBlendOptions", "fold_blend"]


@dataclass(frozen=True, slots=True)
class FoldBlendOptions:
    """alpha: the blend coefficient; 0 gives the base, 1 the adapter, others extrapolate."""

    alpha: float


def fold_blend(ir: AdapterIR, options: FoldBlendOptions) -> PassResult:
    """Multiply every linear delta by alpha (LowRank, LoHa / LoKr scales, Bias deltas); exact per module.

    IA3's scale vectors v become 1 + alpha * (v - 1), also exact per module: the module's output
    (or, for a feedforward module, its input) is scaled, and a blend of y and v * y is
    (1 - alpha + alpha * v) * y. Usage: `--pass fold-blend:alpha=0.5`. DoRA and Replace ops are
    not linear in the blend and are refused (UnsupportedError naming the site), except at
    alpha=1 where nothing changes.
    """
    alpha = options.alpha
    if alpha == 1.0:
        return PassResult(ir, False, {"alpha": alpha, "sites": [], "note": "alpha=1 changes nothing"})
    ops, sites = [], []
    for site, op in ir:
        with site_context(site):
            ops.append((site, _blend(op, alpha)))
        sites.append(str(site))
    return PassResult(rebuild(ir, ops), True, {"alpha": alpha, "sites": sorted(set(sites)), "exact": True})


def _blend(op: Op, alpha: float) -> Op:
    """One op with its delta multiplied by alpha."""
    if isinstance(op, LowRank | Factored):
        return dataclasses.replace(op, scale=op.scale * alpha)
    if isinstance(op, Scale):
        return op.blended(alpha)
    if isinstance(op, Bias):
        return Bias(op.delta.scaled(alpha))
    raise UnsupportedError(
        f"a {type(op).__name__} op is not linear in the blend coefficient, so alpha={alpha} "
        "cannot be folded into it exactly",
        fix="blend at runtime (hooks scale) or merge the adapter before blending",
    )
