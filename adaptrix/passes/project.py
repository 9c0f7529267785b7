"""project: carry an adapter's deltas to the base's dimensions (hidden, intermediate, heads, kv heads).

Every delta scale * B @ A stays low rank: each side of it indexes an axis (the residual stream, a
norm's output, the heads of q / k / v, the concatenated head outputs o_proj reads, MLP neurons, or
the vocabulary), and an axis map carries it: B' = push_out @ B (push: source coordinates to the
target's) and A' = A @ pull_in (pull: reads the source's coordinates off the target's). So
delta' = push_out @ delta @ pull_in, and no dense [out, in] delta is formed.

The methods:

- truncate: keep the overlapping coordinates and zero-pad the rest; heads keep their GQA group
  (kv head k -> k, query head j of group k -> query head j of group k: head h -> h when the group
  size is kept), head_dim cut or padded per rotary half. Exact on a model grown wider with its new
  dimensions, heads and neurons appended after the old ones and unused by the old function.
- interpolate: linear resampling (end points aligned) of each changed axis, of the head index and
  of head_dim separately for attention. A naive control: it moves every delta, exact nowhere.
- svd: uses the base's weights. The deltas are first mapped (as truncate does, or, with
  source=SRC_BASE, through maps aligned from both models' weights: see project_align), then kept
  inside the subspaces the target's weights use (see project_plan.Subspaces): LoRA-X's idea of
  confining a carried adapter to the target weights' singular subspaces, taken per axis (the
  residual stream's writers, live heads and neurons) rather than per weight, because a per-weight
  row space is smaller than the space a module's inputs take and would cut deltas that matter.
  By default (energy=1) every residual direction with a singular value above 1e-6 of the largest
  is kept: on a grown model exactly the old ones, so the projection is exact there and changes
  nothing on a trained model of full rank; energy < 1 keeps only the dominant directions.

DoRA and Replace ops hold the source's own weights (norms, magnitudes) and are carried only when
the dimensions do not change; otherwise they are refused naming the site. Carrying one op is
project_carry.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, site_context
from adaptrix.ir.values import AdapterIR, Site, SourceModel
from adaptrix.passes.base import PassResult, rebuild
from adaptrix.passes.project_align import Alignment
from adaptrix.passes.project_carry import AXES, Carrier
from adaptrix.passes.project_maps import weight_reader
from adaptrix.passes.project_plan import AlignedPlan, GeometricPlan, Subspaces

__all__ = ["METHODS", "ProjectOptions", "project", "source_base"]

METHODS = ("svd", "truncate", "interpolate")
DIMENSIONS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size")
_SAME_VOCAB = frozenset({"tokens"})


@dataclass(frozen=True, slots=True)
class ProjectOptions:
    """method: svd, truncate or interpolate.

    source (svd only): the directory of the base the adapter was made for; its weights and the
    base's align the two models' coordinates. energy (svd only, default 1): the share of the
    squared singular values of the base's residual-stream writers whose directions are kept.
    """

    method: str = "svd"
    source: str | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        """A known method, and source / energy only with svd."""
        if self.method not in METHODS:
            raise ValueError(f"option method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.source is not None and self.method != "svd":
            raise ValueError("option source goes with method=svd only")
        if self.energy is not None and self.method != "svd":
            raise ValueError("option energy goes with method=svd only")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"option energy={self.energy} must be in (0, 1]")


def project(ir: AdapterIR, options: ProjectOptions, base: Checkpoint) -> PassResult:
    """Carry every op from the adapter's source dimensions (ir.source) to the base's.

    Usage: `--pass project:method=svd` (or truncate, interpolate; `source=DIR` aligns with the
    adapter's own base). The result keeps the adapter's depth (redistribute changes depth). Report
    per site: method, [out, in] and rank before and after, `round_trip_error` (the carried delta
    read back in the source's coordinates against the original, relative Frobenius),
    `relative_error` and `energy_kept` of the lossy step (svd: the share of the mapped delta
    outside the kept subspaces; truncate / interpolate: the round trip), and their maxima.
    """
    source, target = ir.source, dataclasses.replace(base.source, num_layers=ir.source.num_layers)
    same = all(getattr(source, f) == getattr(target, f) for f in DIMENSIONS)
    if same and options.method != "svd":
        note = "the adapter's dimensions already are the base's: nothing to carry"
        return PassResult(
            dataclasses.replace(ir, source=target), False, {"method": options.method, "note": note}
        )
    read_target, read_source = weight_reader(base), None
    if options.method != "svd":
        plan = GeometricPlan(source, target, interpolate=options.method == "interpolate")
    elif options.source is None:
        plan = GeometricPlan(source, target, interpolate=False)
    else:
        read_source = weight_reader(source_base(options.source, source))
        plan = AlignedPlan(Alignment(read_source, read_target, source, target))
    subspaces = Subspaces(read_target, target, options.energy or 1.0) if options.method == "svd" else None
    carrier = Carrier(plan, subspaces, options.method, same, (read_target, read_source))
    ops, sites = [], []
    for index, (site, op) in enumerate(ir):
        with site_context(site):
            _check_vocabulary(site, source, target)
            new, entry = carrier.carry(site, op, f"project.{index}")
        ops.append((site, new))
        sites.append({"site": str(site), "op": type(op).__name__, "method": options.method, **entry})
    report = {
        "method": options.method,
        "source": source.as_dict(),
        "target": target.as_dict(),
        "sites": sites,
    }
    for key in ("relative_error", "round_trip_error"):
        report[f"max_{key}"] = max((entry.get(key, 0.0) for entry in sites), default=0.0)
    # How much the carry stretched the deltas: about 1 where the models share a scale; an
    # alignment far from it (an independent model) says the maps, not the deltas, dominate.
    ratios = [entry["norm_ratio"] for entry in sites if "norm_ratio" in entry]
    report["norm_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    if subspaces is not None:
        report["residual_directions_kept"] = subspaces.residual_kept
    return PassResult(dataclasses.replace(rebuild(ir, ops), source=target), True, report)


def source_base(path: str, expected: SourceModel) -> Checkpoint:
    """The checkpoint at `path`, which must have the adapter's dimensions."""
    try:
        origin = Checkpoint(path)
    except BadInputError as exc:
        raise BadInputError(
            f"option source={path} is not a base model directory: {exc.message}",
            fix="give the directory of the base the adapter was made for",
        ) from None
    fields = (*DIMENSIONS, "num_layers")
    for name in fields:
        if getattr(origin.source, name) != getattr(expected, name):
            raise BadInputError(
                f"option source={path} has {name}={getattr(origin.source, name)}, but the adapter was made "
                f"for {name}={getattr(expected, name)}",
                fix="give the directory of the base the adapter was made for",
            )
    return origin


def _check_vocabulary(site: Site, source: SourceModel, target: SourceModel) -> None:
    if AXES.get(site.role, ("", ""))[0] in _SAME_VOCAB and source.vocab_size != target.vocab_size:
        raise BadInputError(
            f"the adapter's vocabulary has {source.vocab_size} tokens, the base's {target.vocab_size}: "
            "token rows cannot be carried",
            fix="use a base with the adapter's tokenizer, or drop the embedding and head deltas",
        )
