"""The sites a base model provides: its modules by (layer, key), and every site with its shape."""

from __future__ import annotations

from dataclasses import dataclass

from adaptrix.binders.table import Layout, split_rows
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.values import Role, Site

__all__ = ["BaseSite", "base_modules", "base_sites"]


def base_modules(base: Checkpoint) -> dict[tuple[int | None, str], str]:
    """Each module of the base that its binder can place, by (layer, key) -> its name."""
    found: dict[tuple[int | None, str], str] = {}
    for tensor in base.tensors:
        module_name = tensor.rpartition(".")[0]
        placement = base.binder.resolve(module_name)
        if placement is not None:
            found.setdefault((placement.layer, placement.key), module_name)
    return found


@dataclass(frozen=True, slots=True)
class BaseSite:
    """A site of the base: its module, the role's canonical [out, in] shape ([dim, 0]: 1-D), parameters."""

    module: str
    shape: tuple[int, int]
    params: frozenset[str]


def base_sites(base: Checkpoint) -> dict[Site, BaseSite]:
    """Every site the base's modules provide (a fused module provides one per role)."""
    params: dict[str, set[str]] = {}
    for tensor in base.tensors:
        module, _, param = tensor.rpartition(".")
        params.setdefault(module, set()).add(param)
    sites: dict[Site, BaseSite] = {}
    for (layer, _), name in base_modules(base).items():
        module = base.binder.resolve(name).module
        info = base.info(f"{name}.weight")
        if info is None:
            continue
        stored = info.shape
        if module.layout is Layout.CONV1D:
            out_rows, in_cols = stored[1], stored[0]
        else:
            out_rows, in_cols = (stored[0], stored[1]) if len(stored) == 2 else (stored[0], 0)
        index = split_rows(module.split, base.source)
        sizes = [len(rows) for rows in index] if index is not None else [out_rows]
        for role, rows in zip(module.roles, sizes, strict=True):
            sites[Site(layer, role)] = BaseSite(name, (rows, in_cols), frozenset(params[name]))
    embed, head = Site(None, Role.EMBED), Site(None, Role.LM_HEAD)
    if head not in sites and embed in sites and base.source.tie_word_embeddings:
        head_module = base.binder.lm_head_weight.rpartition(".")[0]
        sites[head] = BaseSite(head_module, sites[embed].shape, frozenset({"weight"}))
    return sites
