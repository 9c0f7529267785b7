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
the dimensions do not change; otherwise they are refused naming the site.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError, site_context
from adaptrix.ir.values import AdapterIR, Bias, LazyTensor, LowRank, Op, Replace, Role, Site, SourceModel
from adaptrix.passes.base import PassResult, rebuild
from adaptrix.passes.project_align import Alignment, safe_reciprocal
from adaptrix.passes.project_maps import factor_error, factor_norm2, weight_reader
from adaptrix.passes.project_plan import AlignedPlan, GeometricPlan, Subspaces

__all__ = ["METHODS", "ProjectOptions", "project", "source_base"]

METHODS = ("svd", "truncate", "interpolate")
DIMENSIONS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size")
_SAME_VOCAB = frozenset({"tokens"})
_FIXED = frozenset({"tokens", "rows"})  # axes that are not mapped (vocabulary, positions, labels)

# role -> (axis of the output side B, axis of the input side A); "res_out": A's rows are residual vectors
AXES: dict[Role, tuple[str, str]] = {
    Role.ATTN_Q: ("q", "u:attn_norm"),
    Role.ATTN_K: ("k", "u:attn_norm"),
    Role.ATTN_V: ("v", "u:attn_norm"),
    Role.ATTN_O: ("res", "z"),
    Role.MLP_GATE: ("gate", "u:mlp_norm"),
    Role.MLP_UP: ("up", "u:mlp_norm"),
    Role.MLP_DOWN: ("res", "ff"),
    Role.EMBED: ("tokens", "res_out"),
    Role.EMBED_POS: ("rows", "res_out"),
    Role.EMBED_TYPE: ("rows", "res_out"),
    Role.LM_HEAD: ("tokens", "u:final_norm"),
    Role.POOLER: ("res", "res"),
    Role.CLS_DENSE: ("res", "res"),
    Role.CLS_HEAD: ("rows", "res"),
    # norms take Bias ops only: their output is the norm's own axis
    Role.ATTN_NORM: ("u:attn_norm", ""),
    Role.MLP_NORM: ("u:mlp_norm", ""),
    Role.FINAL_NORM: ("u:final_norm", ""),
    Role.EMBED_NORM: ("u:embed_norm", ""),
}


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
    carrier = _Carrier(plan, subspaces, options.method, same, (read_target, read_source))
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


class _Carrier:
    """Carries one op at a time through a plan (and svd's subspaces)."""

    def __init__(self, plan, subspaces: Subspaces | None, method: str, same: bool, readers: tuple):
        self.plan, self.subspaces, self.method, self.same = plan, subspaces, method, same
        self.read_target, self.read_source = readers

    def carry(self, site: Site, op: Op, origin: str) -> tuple[Op, dict]:
        """The op in the base's dimensions and its report entry."""
        if site.role not in AXES:
            raise UnsupportedError(f"project does not know the axes of role {site.role}")
        if isinstance(op, LowRank) and AXES[site.role][1]:
            return self._low_rank(site, op, origin)
        if isinstance(op, Bias):
            return self._bias(site, op, origin)
        if self.same:
            return op, {"note": "carried unchanged: the dimensions already are the base's"}
        if isinstance(op, Replace):
            return self._replace(site, op, origin)
        why = {"DoRA": "its magnitudes are norms of the source's own weights",
               "Factored": "its dense delta has no low-rank sides to map",
               "Scale": "its per-feature scales belong to the source's features"}  # fmt: skip
        kind = getattr(op, "label", type(op).__name__)
        raise UnsupportedError(
            f"a {kind} op cannot be carried to other dimensions ({why.get(type(op).__name__, 'not linear')})",
            fix="carry a plain LoRA adapter, or use a base with the adapter's dimensions",
        )

    def _replace(self, site: Site, op: Replace, origin: str) -> tuple[Replace, dict]:
        """New values: the base's own plus the carried change (new - source's, read or estimated)."""
        out_kind, in_kind = AXES[site.role]
        tensors = {}
        for param, tensor in op.tensors.items():
            value, own = tensor.load().double(), self.read_target(site, param)
            if own is None:
                raise BadInputError(f"the base has no {param} parameter here for the new values to replace")
            gain = not in_kind and param == "weight"
            before = self.read_source(site, param) if self.read_source is not None else None
            if before is None and (gain or self.method == "interpolate"):
                raise UnsupportedError(
                    f"new {param} values (a Replace op) need the source model's own to be carried "
                    f"{'as a relative change' if gain else 'by interpolation'}",
                    fix="use method=svd with source=THE_ADAPTER'S_BASE",
                )
            if gain:  # a norm's gain: carry its relative change, the base keeps its own scale
                change = value * safe_reciprocal(before) - 1
                new = own * (1 + self._push(out_kind, site.layer, change[:, None])[:, 0])
            else:  # the source's value is read back from the base's where it is not given
                before = self._back(out_kind, in_kind, site.layer, own) if before is None else before
                new = own + self._carry_dense(out_kind, in_kind, site.layer, value - before)
            tensors[param] = LazyTensor.of(new.float(), f"{origin}.{param}")
        read = "the source's" if self.read_source is not None else "read back from the base's"
        return Replace(tensors), {"params": sorted(op.tensors), "change_from": read}

    def _carry_dense(
        self, out_kind: str, in_kind: str, layer: int | None, delta: torch.Tensor
    ) -> torch.Tensor:
        if delta.dim() == 1:
            return self._push(out_kind, layer, delta[:, None])[:, 0]
        return self._pull(in_kind, layer, self._push(out_kind, layer, delta))

    def _back(self, out_kind: str, in_kind: str, layer: int | None, own: torch.Tensor) -> torch.Tensor:
        if own.dim() == 1:
            return self._back_rows(out_kind, layer, own[:, None])[:, 0]
        return self._back_cols(in_kind, layer, self._back_rows(out_kind, layer, own))

    def _low_rank(self, site: Site, op: LowRank, origin: str) -> tuple[LowRank, dict]:
        out_kind, in_kind = AXES[site.role]
        a, b = op.a.load().double(), op.b.load().double()
        b_new, a_new = self._push(out_kind, site.layer, b), self._pull(in_kind, site.layer, a)
        entry = {"shape_before": list(op.shape), "shape_after": [b_new.shape[0], a_new.shape[1]],
                 "rank_before": op.rank, "rank_after": op.rank}  # fmt: skip
        lossy = self._lossy(out_kind, in_kind, site.layer, b_new, a_new)
        if lossy is not None:
            b_new, a_new, entry["relative_error"], entry["energy_kept"] = lossy
        back = (self._back_rows(out_kind, site.layer, b_new), self._back_cols(in_kind, site.layer, a_new))
        entry["round_trip_error"] = factor_error((b, a), back)
        before = factor_norm2(b, a)
        entry["norm_ratio"] = math.sqrt(factor_norm2(b_new, a_new) / before) if before > 0 else 1.0
        if lossy is None:
            entry["relative_error"] = entry["round_trip_error"]
            entry["energy_kept"] = max(0.0, 1.0 - entry["round_trip_error"] ** 2)
        a_lazy = LazyTensor.of(a_new.float(), f"{origin}.lora_A")
        return LowRank(a_lazy, LazyTensor.of(b_new.float(), f"{origin}.lora_B"), op.scale), entry

    def _bias(self, site: Site, op: Bias, origin: str) -> tuple[Bias, dict]:
        kind = AXES[site.role][0]
        delta = op.delta.load().double()[:, None]
        pushed = self._push(kind, site.layer, delta)
        if self.subspaces is not None and kind not in _FIXED:
            pushed = self.subspaces.project_rows(kind, site.layer, pushed)
        back = self._back_rows(kind, site.layer, pushed)
        error = float((back - delta).norm() / delta.norm()) if float(delta.norm()) > 0 else 0.0
        entry = {"shape_before": [delta.shape[0]], "shape_after": [pushed.shape[0]],
                 "round_trip_error": error, "relative_error": error,
                 "energy_kept": max(0.0, 1.0 - error**2)}  # fmt: skip
        return Bias(LazyTensor.of(pushed[:, 0].float(), f"{origin}.bias")), entry

    def _lossy(self, out_kind: str, in_kind: str, layer: int | None, b: torch.Tensor, a: torch.Tensor):
        """svd: (B, A) kept inside the target's subspaces, the relative error and the energy kept."""
        if self.subspaces is None:
            return None
        kept_b = b if out_kind in _FIXED else self.subspaces.project_rows(out_kind, layer, b)
        in_axis = "res" if in_kind == "res_out" else in_kind
        kept_a = a if in_axis in _FIXED else self.subspaces.project_cols(in_axis, layer, a)
        total = factor_norm2(b, a)
        error = factor_error((b, a), (kept_b, kept_a))
        energy = factor_norm2(kept_b, kept_a) / total if total > 0 else 1.0
        return kept_b, kept_a, error, energy

    def _push(self, kind: str, layer: int | None, b: torch.Tensor) -> torch.Tensor:
        return b if kind in _FIXED else self.plan.axis(kind, layer).push(b)

    def _pull(self, kind: str, layer: int | None, a: torch.Tensor) -> torch.Tensor:
        if kind in _FIXED:
            return a
        if kind == "res_out":
            return self.plan.axis("res", layer).push(a.T).T
        return self.plan.axis(kind, layer).pull(a)

    def _back_rows(self, kind: str, layer: int | None, b: torch.Tensor) -> torch.Tensor:
        return b if kind in _FIXED else self.plan.axis(kind, layer).back_rows(b)

    def _back_cols(self, kind: str, layer: int | None, a: torch.Tensor) -> torch.Tensor:
        if kind in _FIXED:
            return a
        if kind == "res_out":
            return self.plan.axis("res", layer).back_rows(a.T).T
        return self.plan.axis(kind, layer).back_cols(a)
