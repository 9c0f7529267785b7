"""combine's ties / dare_linear / dare_ties: PEFT's merge formulas on each site's dense delta, then an SVD.

The formulas follow `peft.utils.merge_utils` step for step (magnitude pruning with topk, random
pruning with a Bernoulli mask rescaled by 1/density, sign election on the unweighted pruned deltas,
disjoint merge), so that the result equals PEFT's `add_weighted_adapter(combination_type=
"ties_svd" | "dare_linear_svd" | "dare_ties_svd")` at the same rank.
"""

from __future__ import annotations

import math

import torch

from adaptrix.toolchain.ir import LazyTensor, LowRank

__all__ = ["SPARSE_METHODS", "factor_dense", "merge_deltas"]

SPARSE_METHODS = ("ties", "dare_linear", "dare_ties")


def merge_deltas(
    method: str,
    deltas: list[torch.Tensor],
    weights: list[float],
    density: float,
    sign_method: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """One site's deltas (float32, [out, in] each) merged by ties, dare_linear or dare_ties."""
    if method == "ties":
        pruned = [_keep_largest(delta, density) for delta in deltas]
    else:
        pruned = [_keep_random(delta, density, generator) for delta in deltas]
    stacked = torch.stack(pruned)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
    if method == "dare_linear":
        return weighted.sum(dim=0)
    agrees = _majority_sign_mask(stacked, sign_method)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The delta with all but its int(density * numel) largest-magnitude entries zeroed."""
    if density >= 1:
        return delta
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=int(density * delta.numel())).indices] = 1
    return delta * mask.reshape(delta.shape)


def _keep_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """The delta with each entry kept with probability density, kept ones divided by density."""
    if density >= 1:
        return delta  # PEFT draws no mask at density 1, so the random stream is not advanced
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def _majority_sign_mask(stacked: torch.Tensor, sign_method: str) -> torch.Tensor:
    """Where each adapter's entry has the elected sign (by total value or by count of signs)."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1.0, -1.0)


def factor_dense(delta: torch.Tensor, origin: str, rank: int) -> tuple[LowRank, dict]:
    """The best rank-`rank` factorisation of a dense delta (float64 SVD, balanced factors, scale 1)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = min(rank, len(s))
    root = s[:keep].sqrt()
    b = (u[:, :keep] * root).float()
    a = (root[:, None] * vh[:keep]).float()
    squares = s.square()
    total, dropped = float(squares.sum()), float(squares[keep:].sum())
    new = LowRank(LazyTensor.of(a, f"{origin}.lora_A"), LazyTensor.of(b, f"{origin}.lora_B"), 1.0)
    report = {
        "rank_after": keep,
        "density_kept": float((delta != 0).sum()) / delta.numel(),
        "relative_error": math.sqrt(dropped / total) if total > 0 else 0.0,
        "energy_kept": 1.0 - dropped / total if total > 0 else 1.0,
    }
    return new, report
