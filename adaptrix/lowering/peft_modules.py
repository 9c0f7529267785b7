"""Per module of the base, what a PEFT adapter must hold to compute an IR's ops exactly.

Fused modules get their roles back together: roles that share an A (and a scale) become one
pair with their B rows in place; roles with different A's are concatenated along the rank (A
stacked, each B in its own rows and rank columns, its scale folded in), which is exact. Biases
and replaced parameters become the module's new values, in the checkpoint's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptrix.binders.table import Layout, Placement, fuse_rows, split_rows
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import AdaptrixError, BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, Bias, DoRA, Factored, LowRank, Op, Replace, Role, Scale, Site
from adaptrix.lowering.merge_math import merge_tensor

__all__ = ["LoraPair", "ModuleDelta", "grouped_pairs", "module_deltas"]


@dataclass(frozen=True, slots=True)
class LoraPair:
    """A module's whole low-rank delta, canonical: scale * B [out, r] @ A [r, in] (+ DoRA magnitude)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class ModuleDelta:
    """One module of the base and what the adapter does to it."""

    name: str
    placement: Placement
    lora: LoraPair | None
    params: dict[str, torch.Tensor]  # new parameter values (stored layout): biases, replaced tensors
    replaced: bool  # a Replace op changes it (PEFT: modules_to_save)


def module_deltas(ir: AdapterIR, base: Checkpoint) -> list[ModuleDelta]:
    """Every module of the base that the IR changes, in checkpoint order."""
    by_site = ir.by_site()
    names = base.module_names()  # a tied head is listed though it has no tensor
    deltas, used = [], set()
    for name in names:
        placement = base.binder.resolve(name)
        if placement is None:
            continue
        sites = [Site(placement.layer, role) for role in placement.module.roles]
        role_ops = [tuple(by_site.get(site, ())) for site in sites]
        if not any(role_ops) or used & set(sites):
            continue
        used.update(sites)
        try:
            deltas.append(_module_delta(name, placement, role_ops, base))
        except AdaptrixError as exc:
            raise exc.with_context(name) from None
    if missing := [site for site in ir.sites() if site not in used]:
        raise BadInputError(f"{missing[0]}: the base has no module for it", path=base.path,
                            fix="use a base whose architecture has that role")  # fmt: skip
    return deltas


def _module_delta(name: str, placement: Placement, role_ops: list[tuple[Op, ...]], base: Checkpoint):
    kinds = [op.label for ops in role_ops for op in ops if isinstance(op, Factored | Scale)]
    if kinds:
        raise UnsupportedError(
            f"a {kinds[0]} op cannot be written as a PEFT LoRA adapter",
            fix="compile the source adapter directly (--target merged, hooks or onnx-cpu)",
        )
    weight_ops = [[op for op in ops if isinstance(op, LowRank | DoRA)] for ops in role_ops]
    index = split_rows(placement.module.split, base.source)
    lora = _pair(weight_ops, index, placement, base) if any(weight_ops) else None
    other = [tuple(op for op in ops if isinstance(op, Replace | Bias)) for ops in role_ops]
    params = sorted(
        {p for ops in other for op in ops for p in (op.tensors if isinstance(op, Replace) else ["bias"])}
    )
    values = {param: _param_value(name, placement, param, other, base) for param in params}
    replaced = any(isinstance(op, Replace) for ops in other for op in ops)
    return ModuleDelta(name, placement, lora, values, replaced)


def _pair(weight_ops: list[list[Op]], index, placement: Placement, base: Checkpoint) -> LoraPair:
    """The module's low-rank ops as one pair (roles sharing A and scale share rank)."""
    pairs = grouped_pairs(weight_ops, index, _canonical_out(placement, base))
    if len(pairs) == 1:
        a, b, scale = pairs[0]
    else:  # concatenated ranks: each group's scale folded into its columns of B
        a, b, scale = torch.cat([p[0] for p in pairs]), torch.cat([p[1] * p[2] for p in pairs], 1), 1.0
    return LoraPair(a, b, scale, _magnitude(weight_ops, index, placement))


def grouped_pairs(
    weight_ops: list[list[Op]], index, out_rows: int
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """A module's low-rank ops grouped by shared A and scale: (A [r, in], B [out, r], scale) each.

    `index`: each role's rows of the module's output (None: one role, all rows); a group's B holds
    each of its roles' B in that role's rows, zeros elsewhere.
    """
    groups: dict[tuple[int, float], tuple[torch.Tensor, list]] = {}
    for rows, ops in zip(index or [None], weight_ops, strict=True):
        for op in ops:
            low_rank = op.low_rank if isinstance(op, DoRA) else op
            key = (id(low_rank.a), low_rank.scale)
            if key not in groups:
                groups[key] = (low_rank.a.load(), [])
            groups[key][1].append((rows, low_rank.b))
    pairs = []
    for (_, scale), (a, parts) in groups.items():
        b = torch.zeros(out_rows, a.shape[0])
        for rows, part in parts:
            b[slice(None) if rows is None else rows] += part.load()
        pairs.append((a, b, scale))
    return pairs


def _magnitude(weight_ops: list[list[Op]], index, placement: Placement) -> torch.Tensor | None:
    found = [ops for ops in weight_ops if any(isinstance(op, DoRA) for op in ops)]
    if not found:
        return None
    if len(found) != len(weight_ops) or any(len(ops) != 1 for ops in weight_ops):
        raise UnsupportedError(
            "has DoRA on some roles of the module and not on others (or beside other low-rank ops): "
            "a PEFT DoRA module has one LoRA pair and one magnitude",
            fix="convert to --to air, or compile with --target merged",
        )
    ops = [ops[0] for ops in weight_ops]
    per_column = placement.module.layout is Layout.EMBEDDING
    if any(op.per_column != per_column for op in ops):
        raise UnsupportedError("has a DoRA magnitude per " + ("row" if per_column else "column") +
                               ", which PEFT does not use for this kind of module",
                               fix="compile with --target merged")  # fmt: skip
    magnitudes = [op.magnitude.load() for op in ops]
    return magnitudes[0] if index is None or per_column else fuse_rows(magnitudes, index)


def _canonical_out(placement: Placement, base: Checkpoint) -> int:
    info = base.info(_weight_name(placement, base))
    return info.shape[1] if placement.module.layout is Layout.CONV1D else info.shape[0]


def _weight_name(placement: Placement, base: Checkpoint) -> str:
    """The stored tensor of a module's weight (a tied head's is the embedding's)."""
    name = f"{placement.name}.weight"
    if name in base.tensors or placement.module.roles != (Role.LM_HEAD,):
        return name
    for tensor in base.tensors:
        found = base.binder.resolve(tensor.rpartition(".")[0])
        if found is not None and found.module.roles == (Role.EMBED,) and tensor.endswith(".weight"):
            return tensor
    raise BadInputError("has no weight of its own and no embedding to be tied to", path=base.path,
                        fix="use a base with an output head")  # fmt: skip


def _param_value(name: str, placement: Placement, param: str, ops, base: Checkpoint) -> torch.Tensor:
    """A parameter's new value in the checkpoint's layout: replaced, then biases added."""
    stored = _weight_name(placement, base) if param == "weight" else f"{name}.{param}"
    if stored not in base.tensors:
        raise UnsupportedError(
            f"changes {param}, which the module has no tensor for in the base",
            path=base.path,
            fix="a PEFT adapter can only set the parameters a module has; use --to air",
        )
    return merge_tensor(base.read(stored), param, placement, ops, base.source, torch.float32)
