"""combine: several adapters into one, on the deltas (never A and B separately)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaptrix.ir.errors import BadInputError, UnsupportedError, site_context
from adaptrix.ir.values import AdapterIR, Bias, LazyTensor, LowRank, Site, site_order
from adaptrix.passes.base import PassResult
from adaptrix.passes.combine_sparse import SPARSE_METHODS, merge_unit, peft_units
from adaptrix.passes.reduce_rank import truncate

__all__ = ["METHODS", "CombineOptions", "combine"]

METHODS = ("linear", "cat", "svd", *SPARSE_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True, slots=True)
class CombineOptions:
    """method; weights: one per adapter (default all 1); rank: svd's (or ties/dare's) rank.

    density (ties, dare_*: the share of entries kept, required), seed (dare_*: default 0) and
    majority_sign_method (ties, dare_ties: total or frequency, default total) as in PEFT.
    """

    method: str = "linear"
    weights: tuple[float, ...] | None = None
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    majority_sign_method: str | None = None

    def __post_init__(self) -> None:
        """A known method and only the options that method takes, in range."""
        if self.method not in METHODS:
            raise ValueError(f"option method={self.method!r} is not one of {', '.join(METHODS)}")
        sparse = self.method in SPARSE_METHODS
        if self.rank is not None and not (sparse or self.method == "svd"):
            raise ValueError(f"option rank goes with method=svd or {', '.join(SPARSE_METHODS)}")
        if self.method == "svd" and self.rank is None:
            raise ValueError("option rank is required with method=svd")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"option rank={self.rank} must be at least 1")
        if self.density is not None and not sparse:
            raise ValueError(f"option density goes with method={'|'.join(SPARSE_METHODS)} only")
        if self.density is None and sparse:
            raise ValueError(f"option density is required with method={self.method} (PEFT has no default)")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"option density={self.density} must be in (0, 1]")
        if self.seed is not None and not self.method.startswith("dare"):
            raise ValueError("option seed goes with method=dare_linear or dare_ties")
        if self.majority_sign_method is not None and self.method not in ("ties", "dare_ties"):
            raise ValueError("option majority_sign_method goes with method=ties or dare_ties")
        if self.majority_sign_method not in (None, *SIGN_METHODS):
            found = self.majority_sign_method
            raise ValueError(f"option majority_sign_method={found!r} is not one of {', '.join(SIGN_METHODS)}")


def combine(irs: Sequence[AdapterIR], options: CombineOptions) -> PassResult:
    """Make one adapter whose delta at every site is sum_i weight_i * delta_i.

    Usage: `--pass combine:method=linear,weights=0.7,0.3` (weights are comma-separated, one per
    adapter, in the order the adapters are given). `linear` and `cat` both stack the factors
    (A = [A_1; A_2], B = [w_1 s_1 B_1, w_2 s_2 B_2], scale 1): exact, the ranks add up, mixed
    ranks allowed (PEFT's "cat"; its "linear" averages A and B separately, which is not the
    weighted sum). `svd` with `rank=N` is linear followed by reduce-rank to N, and reports the
    relative Frobenius error per site. Bias deltas are summed with the weights. DoRA and Replace
    ops cannot be combined exactly and are refused, naming the site.

    `ties`, `dare_linear` and `dare_ties` (`density=D`, PEFT's `*_svd` combination types) apply
    PEFT's formula to each site's dense delta (sites in model order, one seeded random stream for
    dare) and re-factor the result by SVD to `rank` (default: the sum of the adapters' ranks at
    the site); the report gives the SVD's error per site. They refuse bias deltas.
    """
    weights = options.weights or (1.0,) * len(irs)
    if len(weights) != len(irs):
        raise BadInputError(f"pass combine: option weights has {len(weights)} values for {len(irs)} adapters",
                            fix="give one weight per adapter, in order")  # fmt: skip
    _check_same_source(irs)
    gathered: dict[Site, list[tuple[float, object]]] = {}
    for ir, weight in zip(irs, weights, strict=True):
        for site, op in ir:
            gathered.setdefault(site, []).append((weight, op))
    if options.method in SPARSE_METHODS:
        return _combine_sparse(irs, gathered, weights, options)
    ops, sites = [], []
    for index, site in enumerate(sorted(gathered, key=site_order)):
        with site_context(site):
            low_rank, biases = stack_weighted(site, gathered[site], f"combine.{index}")
            entry: dict[str, object] = {"site": str(site), "adapters": len(gathered[site])}
            if low_rank is not None and options.method == "svd":
                low_rank, report = truncate(low_rank, f"combine.{index}", options.rank, None)
                entry.update(report)
            elif low_rank is not None:
                entry["rank"] = low_rank.rank
        ops.extend((site, op) for op in ([low_rank] if low_rank else []) + biases)
        sites.append(entry)
    name = "+".join(ir.name for ir in irs)
    report = {"method": options.method, "weights": list(weights), "sites": sites}
    return PassResult(AdapterIR(tuple(ops), irs[0].source, name), True, report)


def _combine_sparse(irs: Sequence[AdapterIR], gathered: dict, weights: tuple[float, ...],
                    options: CombineOptions) -> PassResult:  # fmt: skip
    """Methods ties / dare_*: PEFT's formula on each module's weighted deltas, then an SVD to the rank."""
    generator = torch.Generator().manual_seed(options.seed or 0)
    settings = {"method": options.method, "density": options.density, "rank": options.rank,
                "sign_method": options.majority_sign_method or "total"}  # fmt: skip
    for site, found in gathered.items():
        with site_context(site):
            odd = [getattr(op, "label", type(op).__name__) for _, op in found if not isinstance(op, LowRank)]
            if odd:
                raise UnsupportedError(f"method={options.method} merges LoRA deltas only, not a {odd[0]} op",
                                       fix="use method=linear, or adapters without bias or DoRA")  # fmt: skip
            shapes = {op.shape for _, op in found}
            if len(shapes) > 1:
                raise BadInputError(f"the adapters' deltas have different shapes {sorted(shapes)}")
    adapters = [{site: op for site, op in ir} for ir in irs]
    if any(len(ops) != len(ir.ops) for ops, ir in zip(adapters, irs, strict=True)):
        raise UnsupportedError(f"method={options.method} takes one LoRA delta per site",
                               fix="combine those adapters' ops with method=linear first")  # fmt: skip
    ops, sites = [], []
    for unit in peft_units(irs[0].source, list(gathered)):
        with site_context(unit.sites[0]):
            parts, report = merge_unit(unit, adapters, weights, settings, generator)
        ops.extend(parts)
        module = {"module": " + ".join(str(site) for site in unit.sites)} if len(unit.sites) > 1 else {}
        sites.extend({"site": str(site), "adapters": sum(site in a for a in adapters), **module, **report}
                     for site, _ in parts)  # fmt: skip
    ops.sort(key=lambda entry: site_order(entry[0]))
    name = "+".join(ir.name for ir in irs)
    report = {"method": options.method, "weights": list(weights), "density": options.density,
              "max_relative_error": max((entry["relative_error"] for entry in sites), default=0.0),
              "sites": sites}  # fmt: skip
    return PassResult(AdapterIR(tuple(ops), irs[0].source, name), True, report)


def stack_weighted(
    site: Site, ops: list[tuple[float, object]], origin: str
) -> tuple[LowRank | None, list[Bias]]:
    """The weighted LowRank ops at a site stacked into one, and the weighted Bias ops summed."""
    low = [(w, op) for w, op in ops if isinstance(op, LowRank)]
    bias = [(w, op) for w, op in ops if isinstance(op, Bias)]
    other = [op for _, op in ops if not isinstance(op, LowRank | Bias)]
    if other:
        label = getattr(other[0], "label", type(other[0]).__name__)
        raise UnsupportedError(f"a {label} op cannot be combined exactly with others (only LoRA factors "
                               "and bias deltas stack)", fix="combine adapters made of LoRA and bias deltas "
                               "only, or compile each adapter on its own")  # fmt: skip
    low_rank = None
    if low:
        shapes = {op.shape for _, op in low}
        if len(shapes) > 1:
            raise BadInputError(f"the adapters' deltas have different shapes {sorted(shapes)}")
        rank = sum(op.rank for _, op in low)
        out, inner = low[0][1].shape
        a = LazyTensor((rank, inner), f"{origin}.lora_A", lambda: torch.cat([op.a.load() for _, op in low]))
        b = LazyTensor((out, rank), f"{origin}.lora_B",
                       lambda: torch.cat([op.b.load() * (w * op.scale) for w, op in low], dim=1))  # fmt: skip
        low_rank = LowRank(a, b, 1.0)
    biases = []
    if bias:
        shape = bias[0][1].delta.shape
        if any(op.delta.shape != shape for _, op in bias):
            raise BadInputError("the adapters' bias deltas have different shapes")
        total = LazyTensor(shape, f"{origin}.bias", lambda: sum(op.delta.load() * w for w, op in bias))
        biases.append(Bias(total))
    return low_rank, biases


def _check_same_source(irs: Sequence[AdapterIR]) -> None:
    """All adapters must be made for the same model dimensions."""
    first = irs[0].source
    for ir in irs[1:]:
        if ir.source != first:
            raise BadInputError(f"pass combine: {ir.name} was made for {ir.source.as_dict()}, "
                                f"{irs[0].name} for {first.as_dict()}",
                                fix="project one adapter onto the other's base first")  # fmt: skip
