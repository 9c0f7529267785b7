"""The base's modules an adapter touches: each with the ops at every role of the module."""

from __future__ import annotations

from dataclasses import dataclass

from adaptrix.binders.table import Placement
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, Op, Role, Site
from adaptrix.lowering.head import refuse_new_head

__all__ = ["TouchedModule", "touched_modules"]


@dataclass(frozen=True, slots=True)
class TouchedModule:
    """One module of the base the adapter touches, with the ops at each of its roles."""

    placement: Placement
    weight: str  # the stored tensor holding the module's weight (the embedding for a tied head)
    role_ops: tuple[tuple[Op, ...], ...]


def touched_modules(ir: AdapterIR, base: Checkpoint) -> list[TouchedModule]:
    """The base's modules that have ops, in checkpoint order; every site must find its module."""
    by_site = ir.by_site()
    names = base.module_names()  # a tied head is listed though it has no tensor
    names += [key for key in base.binder.ties if key not in names]  # so are other tied modules
    placements = {name: p for name in names if (p := base.binder.resolve(name)) is not None}
    embed = next(
        (f"{n}.weight" for n, p in placements.items()
         if p.module.roles == (Role.EMBED,) and f"{n}.weight" in base.tensors),
        None,
    )  # fmt: skip
    modules, used = [], set()
    for name, placement in placements.items():
        role_ops = tuple(tuple(by_site.get(Site(placement.layer, r), ())) for r in placement.module.roles)
        if not any(role_ops) or any(Site(placement.layer, r) in used for r in placement.module.roles):
            continue
        weight = f"{name}.weight"
        if weight not in base.tensors:
            head = placement.module.roles == (Role.LM_HEAD,)
            weight = embed if head else _sharer(base, placements, placement)
            if weight is None:
                continue
        used.update(Site(placement.layer, r) for r in placement.module.roles)
        modules.append(TouchedModule(placement, weight, role_ops))
    if missing := [site for site in ir.sites() if site not in used]:
        _refuse_packed(base, missing[0])
        refuse_new_head(ir, base, missing)  # a classifier head the base has not: --target merged adds it
        raise BadInputError(
            f"{missing[0]}: the base has no module for it",
            path=base.path,
            fix="use the base the adapter was made for",
        )
    return modules


def _sharer(base: Checkpoint, placements: dict, placement: Placement) -> str | None:
    """The stored weight a tied module computes with (LUKE's entity head: the entity embeddings')."""
    sharers = base.binder.ties.get(placement.key, ()) if placement.layer is None else ()
    return next((f"{n}.weight" for n, p in placements.items() if p.layer is None and p.key in sharers
                 and f"{n}.weight" in base.tensors), None)  # fmt: skip


def _refuse_packed(base: Checkpoint, site: Site) -> None:
    """A stored expert weight the base keeps packed (saved as transformers 5 loads it): merged only."""
    module = base.binder.layer_modules.get(site.role) if site.layer is not None else None
    if module is not None and module.packed is not None:
        raise UnsupportedError(
            f"{site}: the base stores it packed in {module.packed.module}.{module.packed.param}, "
            "not as a tensor of its own; hooks, ONNX and GGUF are compiled against per-expert tensors",
            path=base.path, fix="use --target merged, or a base saved by save_pretrained (per expert)",
        )  # fmt: skip
