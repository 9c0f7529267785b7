"""A bundle's bottleneck entries: the fields `adaptrix.runtimes.hooks.bottleneck` runs, checked before use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.hooks.activations import ACTIVATIONS
from adaptrix.runtimes.hooks.bundle_schema import check_probe, nonnegative_int, positive_int, string

__all__ = ["MODULE_KEYS", "BottleneckEntry", "check_bottleneck_tensors", "parse_bottleneck"]

MODULE_KEYS = ("block", "output", "residual", "projection")


@dataclass(frozen=True, slots=True)
class BottleneckEntry:
    """One bottleneck of a bundle: where it hooks, its options and its tensors' keys."""

    name: str
    sites: tuple[str, ...]
    block: str
    modules: dict
    probe: dict
    act: str
    size: int
    parallel: bool
    scale: float
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool | str
    adapter_residual_before_ln: bool
    ln_eps: dict
    tensors: dict[str, str]


_ENTRY_KEYS = {"name", "sites", "block", "modules", "probe", "act", "size", "parallel", "scale",
               "original_ln_before", "original_ln_after", "residual_before_ln", "adapter_residual_before_ln",
               "ln_eps", "tensors", "shared"}  # fmt: skip
_FLAGS = ("parallel", "original_ln_before", "original_ln_after", "adapter_residual_before_ln")
_TENSOR_ROLES = {"down", "down_bias", "up", "up_bias", "ln_before_weight", "ln_before_bias",
                 "ln_after_weight", "ln_after_bias"}  # fmt: skip


def parse_bottleneck(raw: object, file) -> BottleneckEntry:
    """A bundle's bottleneck entry, every field checked for the type and range the runtime needs."""
    if not isinstance(raw, dict) or (unknown := sorted(set(raw) - _ENTRY_KEYS)):
        found = (
            f"keys this adaptrix does not know: {unknown[:3]}"
            if isinstance(raw, dict)
            else type(raw).__name__
        )
        raise BadInputError(f"has a malformed bottleneck entry ({found})", path=file)
    name = string(raw.get("name"), file, "bottleneck.name")
    where = f"bottleneck {name!r}"
    modules = _modules(raw.get("modules"), file, where)
    sites = raw.get("sites")
    if not isinstance(sites, list) or not all(isinstance(site, str) and site for site in sites):
        _bad(file, f"{where}.sites", f"expected a list of site names, found {sites!r:.60}")
    probe = raw.get("probe")
    shape = probe.get("shape") if isinstance(probe, dict) else None
    if not isinstance(shape, list) or len(shape) != 2:
        _bad(file, f"{where}.probe.shape", f"expected the projection's 2 sizes, found {shape!r:.60}")
    numel = math.prod(positive_int(n, file, f"{where}.probe.shape") for n in shape)
    check_probe(probe, numel, file, f"{where}.probe")
    flags = {key: raw.get(key) for key in _FLAGS}
    if not all(isinstance(value, bool) for value in flags.values()):
        _bad(file, where, f"expected true or false for each of {list(_FLAGS)}, found {flags}")
    residual = raw.get("residual_before_ln")
    act = raw.get("act")
    if (
        not (isinstance(residual, bool) or residual == "post_add")
        or not isinstance(act, str)
        or act not in ACTIVATIONS
    ):
        _bad(file, where, f"bad residual_before_ln {residual!r:.30} or act {act!r:.30}")
    return BottleneckEntry(
        name=name,
        sites=tuple(sites),
        block=string(raw.get("block"), file, f"{where}.block"),
        modules=modules,
        probe=dict(probe),
        act=act,
        size=positive_int(raw.get("size"), file, f"{where}.size"),
        scale=_number(raw.get("scale"), file, f"{where}.scale"),
        residual_before_ln=residual,
        ln_eps=_ln_eps(raw.get("ln_eps"), file, where),
        tensors=_tensor_keys(raw.get("tensors"), file, where),
        **flags,
    )


def _bad(file, where: str, problem: str) -> None:
    raise BadInputError(f"{where}: {problem}", path=file, fix="the bundle is malformed; compile it again")


def _number(value: object, file, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        _bad(file, where, f"expected a finite number, found {value!r:.40}")
    return float(value)


def _modules(raw: object, file, where: str) -> dict:
    if not isinstance(raw, dict) or not set(raw) <= {*MODULE_KEYS, "norm", "residual_arg"}:
        _bad(file, f"{where}.modules", f"expected an object of {[*MODULE_KEYS, 'norm', 'residual_arg']}")
    for key in MODULE_KEYS:
        string(raw.get(key), file, f"{where}.modules.{key}")
    string(raw.get("norm"), file, f"{where}.modules.norm", optional=True)
    nonnegative_int(raw.get("residual_arg"), file, f"{where}.modules.residual_arg")
    return dict(raw)


def _ln_eps(raw: object, file, where: str) -> dict:
    eps = raw or {}
    if not isinstance(eps, dict) or not set(eps) <= {"before", "after"}:
        _bad(file, f"{where}.ln_eps", f"expected an object with keys before / after, found {raw!r:.60}")
    for key, value in eps.items():
        if _number(value, file, f"{where}.ln_eps.{key}") <= 0:
            _bad(file, f"{where}.ln_eps.{key}", f"expected a positive epsilon, found {value!r}")
    return dict(eps)


def _tensor_keys(raw: object, file, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not set(raw) <= _TENSOR_ROLES:
        _bad(file, f"{where}.tensors", f"expected an object with keys among {sorted(_TENSOR_ROLES)}")
    return {role: string(key, file, f"{where}.tensors.{role}") for role, key in raw.items()}


def check_bottleneck_tensors(
    entry: BottleneckEntry, tensors: dict[str, torch.Tensor], hidden: int, file
) -> None:
    """Every tensor of the entry exists with the shape its role needs; a norm of its own has both halves."""
    shapes = {
        "down": (entry.size, hidden),
        "down_bias": (entry.size,),
        "up": (hidden, entry.size),
        "up_bias": (hidden,),
    }
    for name in ("before", "after"):
        if name in entry.ln_eps:
            shapes[f"ln_{name}_weight"] = shapes[f"ln_{name}_bias"] = (hidden,)
    required = {"down", "up", *(key for key in shapes if key.startswith("ln_"))}
    if unused := sorted(set(entry.tensors) - shapes.keys()):
        _bad(
            file, f"bottleneck {entry.name!r}.tensors", f"{unused[0]} is there without the norm it belongs to"
        )
    for name, shape in shapes.items():
        key = entry.tensors.get(name)
        if (key is None and name in required) or (key is not None and key not in tensors):
            raise BadInputError(
                f"lacks tensor {name} of bottleneck {entry.name!r}", path=file, fix="compile the bundle again"
            )
        if key is not None and tuple(tensors[key].shape) != shape:
            raise BadInputError(
                f"tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shape)}", path=file
            )
