"""route: several LoRA adapters kept side by side and mixed per token by a router (PEFT's Arrow).

PEFT's Arrow (`ArrowConfig`, `create_arrow_model`) computes, for each module and each adapter, a
prototype: the top right singular vector of the adapter's delta B A. Per token x it scores every
adapter by |<x, prototype>| (the sign of a singular vector is arbitrary), keeps the top_k scores,
takes their softmax at `router_temperature`, and adds sum_e coeff_e * scale_e * B_e A_e x. This
pass computes the prototypes exactly (an SVD of the small factors; PEFT approximates them by 15
power iterations from a random vector) and puts one `Routed` op at each site; the hooks and ONNX
targets emit the router. The roles of a fused module (GPT-2 c_attn, Phi-3 qkv_proj) are one PEFT
module: one prototype per adapter for all of them, from the fused delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.route import ROUTE_METHODS, Routed
from adaptrix.ir.values import AdapterIR, LazyTensor, LowRank, Site, site_order
from adaptrix.passes.base import PassResult
from adaptrix.passes.combine_sparse import peft_units

__all__ = ["RouteOptions", "prototype", "prototype_overlap", "route"]


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """method (arrow); top_k: adapters mixed per token; temperature: the softmax's, as PEFT's Arrow.

    PEFT's GenKnowSub (use_gks=true: general adapters averaged and subtracted first) is refused.
    """

    method: str = "arrow"
    top_k: int = 2
    temperature: float = 1.0
    use_gks: bool = False

    def __post_init__(self) -> None:
        """A known method, top_k >= 1, a temperature above 0, no GenKnowSub."""
        if self.use_gks:
            raise ValueError("option use_gks=true (PEFT's GenKnowSub) is not supported; route the "
                             "task adapters as they are")  # fmt: skip
        if self.method not in ROUTE_METHODS:
            raise ValueError(f"option method={self.method!r} is not one of {', '.join(ROUTE_METHODS)}")
        if self.top_k < 1:
            raise ValueError(f"option top_k={self.top_k} must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"option temperature={self.temperature} must be above 0")


def route(irs: Sequence[AdapterIR], options: RouteOptions) -> PassResult:
    """One IR routing between the adapters per token: a Routed op per site, prototypes computed here.

    Usage: `--pass route:method=arrow,top_k=2,temperature=1.0` with two adapters or more, all LoRA
    (no bias, DoRA or other kinds), on the same modules, made for the same base.
    """
    names = _names(irs)
    if options.top_k > len(irs):
        raise BadInputError(f"option top_k={options.top_k} is more than the {len(irs)} adapters",
                            fix=f"give top_k between 1 and {len(irs)}")  # fmt: skip
    per_adapter = [_low_rank_by_site(ir) for ir in irs]
    sites = sorted(per_adapter[0], key=site_order)
    for ir, found in zip(irs[1:], per_adapter[1:], strict=True):
        if set(found) != set(sites):
            odd = sorted(set(found) ^ set(sites), key=site_order)[0]
            raise BadInputError(f"{ir.name} and {irs[0].name} adapt different modules (one of them has "
                                f"{odd}, the other not); Arrow routes adapters of the same target modules",
                                fix="train the adapters on the same target_modules")  # fmt: skip
    ops, overlaps = [], []
    for unit in peft_units(irs[0].source, sites):
        present = [site for site in unit.sites if site in per_adapter[0]]
        protos = torch.stack([prototype([found[site] for site in present]) for found in per_adapter])
        overlaps.append(prototype_overlap(protos))
        shared = LazyTensor.of(protos.to(torch.float32), f"route.{present[0]}.prototypes")
        for site in present:
            experts = tuple(found[site] for found in per_adapter)
            routed = Routed(names, experts, shared, options.top_k, options.temperature, options.method)
            ops.append((site, routed))
    ops.sort(key=lambda entry: site_order(entry[0]))
    report = {"method": options.method, "top_k": options.top_k, "temperature": options.temperature,
              "adapters": list(names), "modules": len(overlaps),
              "overlap": _mean_overlap(names, overlaps)}  # fmt: skip
    return PassResult(AdapterIR(tuple(ops), irs[0].source, "routed"), True, report)


def prototype(parts: Sequence[LowRank]) -> torch.Tensor:
    """The top right singular vector of one module's delta (its roles' B A stacked), float64, sign fixed.

    Exact and cheap: with A_all = [A_1; A_2; ...] = R^T Q^T (QR of A_all^T), the delta is C Q^T with C
    the small [out, R] matrix of each role's B times its rows of R^T; C's top right singular vector,
    mapped by Q, is the delta's. The sign is chosen so that the largest entry is positive.
    """
    a_all = torch.cat([part.a.load().double() for part in parts])
    q, r = torch.linalg.qr(a_all.T)  # a_all = r.T @ q.T
    start, blocks = 0, []
    for part in parts:
        rank = part.rank
        blocks.append(part.b.load().double() @ r.T[start : start + rank])
        start += rank
    _, _, vh = torch.linalg.svd(torch.cat(blocks), full_matrices=False)
    vector = q @ vh[0]
    return vector if vector[vector.abs().argmax()] >= 0 else -vector


def prototype_overlap(protos: torch.Tensor) -> torch.Tensor:
    """|cos| between every two adapters' prototypes of one module, [adapters, adapters]."""
    unit = protos.double() / protos.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).abs()


def _mean_overlap(names: Sequence[str], overlaps: list[torch.Tensor]) -> dict[str, float]:
    """Mean |cos| of each pair of adapters' prototypes over the modules: low means separable."""
    mean = torch.stack(overlaps).mean(0)
    pairs = combinations(range(len(names)), 2)
    return {f"{names[i]}|{names[j]}": round(float(mean[i, j]), 6) for i, j in pairs}


def _names(irs: Sequence[AdapterIR]) -> tuple[str, ...]:
    """The adapters' names, unique, from the same base."""
    names = tuple(ir.name for ir in irs)
    for ir in irs[1:]:
        if ir.source != irs[0].source:
            raise BadInputError(f"{ir.name} was made for {ir.source.as_dict()}, {irs[0].name} for "
                                f"{irs[0].source.as_dict()}", fix="route adapters of one base")  # fmt: skip
    if len(set(names)) != len(names):
        raise BadInputError(f"two adapters are named {sorted(n for n in names if names.count(n) > 1)[0]!r}",
                            fix="give the adapter directories different names")  # fmt: skip
    return names


def _low_rank_by_site(ir: AdapterIR) -> dict[Site, LowRank]:
    """The adapter's one LoRA pair per site; any other op is refused (Arrow routes LoRA pairs)."""
    found: dict[Site, LowRank] = {}
    for site, op in ir:
        if type(op) is not LowRank:
            label = getattr(op, "label", type(op).__name__)
            raise UnsupportedError(f"{ir.name}: {site} has a {label} op; Arrow routes LoRA pairs only",
                                   fix="route LoRA adapters without bias or DoRA")  # fmt: skip
        if site in found:
            raise UnsupportedError(f"{ir.name}: {site} has two LoRA pairs",
                                   fix="route adapters with one LoRA pair per module")  # fmt: skip
        found[site] = op
    return found
