"""reduce-rank: truncated SVD of each low-rank delta via QR of its factors (never the dense matrix)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from adaptrix.ir.errors import site_context
from adaptrix.ir.values import AdapterIR, DoRA, Factored, LazyTensor, LowRank, Scale
from adaptrix.passes.base import PassResult, rebuild

__all__ = ["ReduceRankOptions", "low_rank_svd", "reduce_rank", "truncate"]


@dataclass(frozen=True, slots=True)
class ReduceRankOptions:
    """rank: the most singular values to keep; energy: the share of squared ones to keep. One of them."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        """Exactly one of rank (>= 1) and energy (in (0, 1])."""
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of the options rank and energy")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"option rank={self.rank} must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"option energy={self.energy} must be in (0, 1]")


def low_rank_svd(op: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out, r], S [r], Vh [r, in] of scale * B @ A, from QR of B and A.T and an r x r SVD (float64)."""
    a, b = op.a.load().double(), op.b.load().double()
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(op.scale * (r_b @ r_a.T))
    return q_b @ u, s, vh @ q_a.T


def truncate(op: LowRank, origin: str, rank: int | None, energy: float | None) -> tuple[LowRank, dict]:
    """The best rank-k approximation of the op (Eckart-Young) and what it lost."""
    u, s, vh = low_rank_svd(op)
    squares = s.square()
    total = float(squares.sum())
    if rank is not None:
        keep = min(rank, len(s))
    else:
        cumulative = torch.cumsum(squares, 0) / total if total > 0 else torch.ones_like(s)
        wanted = torch.tensor(energy * (1 - 1e-12), dtype=cumulative.dtype)
        keep = min(int(torch.searchsorted(cumulative, wanted)) + 1, len(s))
    root = s[:keep].sqrt()
    b = (u[:, :keep] * root).float()
    a = (root[:, None] * vh[:keep]).float()
    new = LowRank(LazyTensor.of(a, f"{origin}.lora_A"), LazyTensor.of(b, f"{origin}.lora_B"), 1.0)
    dropped = float(squares[keep:].sum())
    report = {
        "rank_before": op.rank,
        "rank_after": keep,
        "relative_error": math.sqrt(dropped / total) if total > 0 else 0.0,
        "energy_kept": 1.0 - dropped / total if total > 0 else 1.0,
    }
    return new, report


def reduce_rank(ir: AdapterIR, options: ReduceRankOptions) -> PassResult:
    """Truncate every LowRank (and DoRA's low-rank part) to a rank or an energy share.

    Usage: `--pass reduce-rank:rank=4` or `--pass reduce-rank:energy=0.99`. The new factors are
    balanced (sqrt of the singular values on each side) with scale 1. Report per site: ranks
    before and after, relative Frobenius error of the delta (sqrt of the dropped squared singular
    values over the delta's norm, the Eckart-Young optimum) and the energy kept. A site whose rank
    is already at most `rank` is re-factored exactly. LoHa / LoKr deltas and IA3 scales are kept
    as they are and listed under `skipped` with the reason.
    """
    ops, sites, skipped = [], [], []
    for index, (site, op) in enumerate(ir):
        inner = op.low_rank if isinstance(op, DoRA) else op
        if not isinstance(inner, LowRank):
            ops.append((site, op))
            if isinstance(op, Factored | Scale):
                skipped.append({"site": str(site), "op": op.label, "reason": _SKIPPED[type(op)]})
            continue
        with site_context(site):
            new, report = truncate(inner, f"reduce-rank.{index}", options.rank, options.energy)
        ops.append((site, dataclasses.replace(op, low_rank=new) if isinstance(op, DoRA) else new))
        sites.append({"site": str(site), "op": type(op).__name__, **report})
    worst = max((entry["relative_error"] for entry in sites), default=0.0)
    report = {"sites": sites, "max_relative_error": worst, **({"skipped": skipped} if skipped else {})}
    return PassResult(rebuild(ir, ops), bool(sites), report)


_SKIPPED = {
    Factored: "not a low-rank pair (its Hadamard or Kronecker delta is full rank); kept exact",
    Scale: "a scale of the weight, not a delta; kept exact",
}
