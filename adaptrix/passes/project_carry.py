"""project's carrying of one op: each role's axes, and the Carrier that maps an op's sides.

An op's output side B is pushed through its axis map (B' = push_out @ B) and its input side A
pulled (A' = A @ pull_in); svd then keeps both inside the target's subspaces. Each carried op is
read back in the source's coordinates for its report entry. See project.py for the methods.
"""

from __future__ import annotations

import math

import torch

from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Bias, LazyTensor, LowRank, Op, Replace, Role, Site
from adaptrix.passes.project_align import safe_reciprocal
from adaptrix.passes.project_maps import factor_error, factor_norm2
from adaptrix.passes.project_plan import Subspaces

__all__ = ["AXES", "Carrier"]

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


class Carrier:
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
