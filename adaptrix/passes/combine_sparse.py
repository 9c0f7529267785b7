"""combine's ties / dare_linear / dare_ties: PEFT's merge formulas on each module's dense delta, then an SVD.

The formulas follow `peft.utils.merge_utils` step for step (magnitude pruning with topk, random
pruning with a Bernoulli mask rescaled by 1/density, sign election on the unweighted pruned deltas,
disjoint merge), so that the result equals PEFT's `add_weighted_adapter(combination_type=
"ties_svd" | "dare_linear_svd" | "dare_ties_svd")` at the same rank. PEFT merges per module, so
the roles of a fused module (GPT-2 `c_attn`, Phi-3 `qkv_proj` / `gate_up_proj`, GPT-NeoX
`query_key_value`) are pruned, merged and re-factored as the one fused matrix, in the module's own
layout, and the modules are visited in the model's order, the order of dare's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adaptrix.binders import BINDERS
from adaptrix.binders.table import Layout, fuse_rows, split_rows
from adaptrix.ir.values import LazyTensor, LowRank, Op, Role, Site, SourceModel, site_order

__all__ = ["SPARSE_METHODS", "Unit", "factor_dense", "merge_deltas", "merge_unit", "peft_units"]

SPARSE_METHODS = ("ties", "dare_linear", "dare_ties")


_BEFORE_LAYERS = frozenset({Role.EMBED, Role.EMBED_POS, Role.EMBED_TYPE, Role.EMBED_NORM})


@dataclass(frozen=True, slots=True)
class Unit:
    """The sites PEFT merges as one matrix: one module of the model (several roles when fused)."""

    sites: tuple[Site, ...]
    rows: list[torch.Tensor] | None = None  # each role's rows of the fused output
    transposed: bool = False  # Conv1D: PEFT's delta is [in, out]


def peft_units(source: SourceModel, sites: Sequence[Site]) -> list[Unit]:
    """The sites grouped into the model's modules, in the order PEFT walks them.

    The binder's tables are declared in the model's module order: embeddings, then each layer's
    modules, then the final norm and heads. Sites no module holds come last, one unit each.
    """
    present = set(sites)
    binder = BINDERS.get(source.arch)
    units: list[Unit] = []
    model = list(binder.model_modules.values()) if binder is not None else []
    taken: set[Site] = set()  # a role two modules of a table may hold (T5's wi, or wi_1 when gated)

    def add(layer: int | None, module) -> None:
        sites = (Site(layer, role) for role in module.roles)
        found = tuple(site for site in sites if site in present and site not in taken)
        if found:
            taken.update(found)
            rows = split_rows(module.split, source) if len(module.roles) > 1 else None
            units.append(Unit(tuple(Site(layer, role) for role in module.roles) if rows else found, rows,
                              module.layout is Layout.CONV1D))  # fmt: skip

    for module in model:
        if set(module.roles) & _BEFORE_LAYERS:
            add(None, module)
    for layer in sorted({site.layer for site in present if site.layer is not None}):
        for module in _layer_table(binder, source, layer):
            add(layer, module)
    for module in model:
        if not set(module.roles) & _BEFORE_LAYERS:
            add(None, module)
    placed = {site for unit in units for site in unit.sites}
    units.extend(Unit((site,)) for site in sorted(present - placed, key=site_order))
    return units


def _layer_table(binder, source: SourceModel, layer: int) -> list:
    """The modules of a layer in the model's order (an encoder-decoder's: its encoder's or decoder's)."""
    if binder is None:
        return []
    if not binder.stacks:
        return list(binder.layer_modules.values())
    decoder = source.decoder_start is not None and layer >= source.decoder_start
    return list(binder.stacks[-1 if decoder else 0].layer_modules.values())


def merge_unit(
    unit: Unit,
    adapters: Sequence[Mapping[Site, Op]],
    weights: Sequence[float],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> tuple[list[tuple[Site, LowRank]], dict]:
    """One module's LoRA deltas merged as PEFT merges them, re-factored, and split back into roles.

    Adapters without any of the module's sites take no part (PEFT's valid adapters); a fused
    module's missing roles count as zero. `options`: method, density, sign_method, rank.
    """
    taking = [(w, ops) for w, ops in zip(weights, adapters, strict=True) if any(s in ops for s in unit.sites)]
    deltas = [_module_delta(unit, ops) for _, ops in taking]
    if unit.transposed:
        deltas = [delta.T.contiguous() for delta in deltas]
    merged = merge_deltas(str(options["method"]), deltas, [w for w, _ in taking], float(options["density"]),
                          str(options["sign_method"]), generator)  # fmt: skip
    if unit.transposed:
        merged = merged.T
    # PEFT's default: the sum of the adapters' ranks on the module (a fused module's roles share one)
    ranks = [max(ops[site].rank for site in unit.sites if site in ops) for _, ops in taking]
    rank = options["rank"] or sum(ranks)
    origin = f"combine.{unit.sites[0]}".replace(" ", ".")
    fused, report = factor_dense(merged, origin, int(rank))
    if unit.rows is None:
        return [(unit.sites[0], fused)], report
    b = fused.b.load()
    parts = [(site, LowRank(fused.a, LazyTensor.of(b[rows].contiguous(), f"{origin}.{site.role}.B"), 1.0))
             for site, rows in zip(unit.sites, unit.rows, strict=True)]  # fmt: skip
    return parts, report


def _module_delta(unit: Unit, ops: Mapping[Site, Op]) -> torch.Tensor:
    """An adapter's dense delta of the unit's module ([out, in]; fused roles at their rows)."""
    if unit.rows is None:
        return ops[unit.sites[0]].delta()
    found = [ops.get(site) for site in unit.sites]
    inner = next(op.shape[1] for op in found if op is not None)
    parts = [op.delta() if op is not None else torch.zeros(len(rows), inner)
             for op, rows in zip(found, unit.rows, strict=True)]  # fmt: skip
    return fuse_rows(parts, unit.rows)


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
