"""The schema of a bundle's manifest section: every field's type and range, checked before use.

A bundle is input like any other: its manifest may have been edited by hand or by an attacker.
Each value the runtime reads is checked here for its JSON type (a bool is not an int, a string
is not a list), its range (positive sizes, probe indices inside the weight, finite numbers) and
its consistency (DoRA needs LoRA, a norm takes no low-rank delta), so that attaching can never
fail half-way on a malformed field. Standard library only.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from adaptrix.ir.errors import BadInputError

__all__ = [
    "FLOAT_DTYPES",
    "PARAMETER_NAME",
    "check_base",
    "check_probe",
    "check_section",
    "is_int",
    "module_fields",
    "nonnegative_int",
    "positive_int",
    "string",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECTION_KEYS = {"format_version", "tensors_file", "dtype", "base", "modules", "bottlenecks"}
_ENTRY_KEYS = {"name", "layout", "sites", "weight_shape", "out_features", "probe", "lora", "dora", "bias",
               "replace", "dense", "scale_out", "scale_in", "route"}  # fmt: skip
_PROBE_KEYS = {"tensor", "shape", "dtype", "indices", "values"}
_MAX_PROBES = 64
_FLOAT32_MAX = 3.4028234663852886e38
_MAX_SIZE = 2**48


def is_int(value: object) -> bool:
    """An integer in JSON's sense (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(file: Path, where: str, problem: str) -> None:
    raise BadInputError(f"{where}: {problem}", path=file, fix="the bundle is malformed; compile it again")


def positive_int(value: object, file: Path, where: str) -> int:
    """`value` as an int > 0 (and below 2**48: a size, not a number torch cannot hold), or an error."""
    if not is_int(value) or not 0 < value < _MAX_SIZE:
        _refuse(file, where, f"expected a positive integer below 2**48, found {value!r:.60}")
    return value


def nonnegative_int(value: object, file: Path, where: str) -> int:
    """`value` as an int >= 0, or a one-line error naming the field."""
    if not is_int(value) or value < 0:
        _refuse(file, where, f"expected an integer >= 0, found {value!r:.60}")
    return value


def string(value: object, file: Path, where: str, optional: bool = False) -> str | None:
    """`value` as a non-empty string (or None when optional), or a one-line error naming the field."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        _refuse(file, where, f"expected a non-empty string, found {value!r:.60}")
    return value


def _finite(value: object, file: Path, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        _refuse(file, where, f"expected a finite number, found {value!r:.60}")
    return float(value)


def _object(value: object, file: Path, where: str, keys: set[str] | None = None) -> dict:
    if not isinstance(value, dict):
        _refuse(file, where, f"expected an object, found {type(value).__name__}")
    if keys is not None and (unknown := sorted(set(value) - keys)):
        _refuse(file, where, f"has keys this adaptrix does not know: {unknown[:3]}")
    return value


def check_section(section: dict, file: Path) -> None:
    """The section's own fields: known keys, a float dtype, lists of entries."""
    _object(section, file, "bundle", _SECTION_KEYS)
    if section.get("dtype") not in FLOAT_DTYPES:
        _refuse(
            file, "bundle.dtype", f"expected one of {list(FLOAT_DTYPES)}, found {section.get('dtype')!r:.60}"
        )
    for key in ("modules", "bottlenecks"):
        if not isinstance(section.get(key, []), list):
            _refuse(file, f"bundle.{key}", f"expected a list, found {type(section[key]).__name__}")
    if not section.get("modules") and not section.get("bottlenecks"):
        _refuse(file, "bundle", "holds no modules and no bottlenecks: it would attach nothing")


def check_base(section: dict, file: Path) -> dict:
    """The `base` a bundle was compiled for: model_type, config values, dimensions."""
    base = _object(section.get("base"), file, "bundle.base")
    string(base.get("model_type"), file, "bundle.base.model_type")
    _object(base.get("config", {}), file, "bundle.base.config")
    dimensions = _object(base.get("dimensions"), file, "bundle.base.dimensions")
    if section.get("bottlenecks"):
        positive_int(dimensions.get("hidden_size"), file, "bundle.base.dimensions.hidden_size")
    return base


def check_probe(raw: object, numel: int, file: Path, where: str) -> tuple[list[int], list[float], str]:
    """A probe's indices (each inside a weight of `numel` elements), finite values and dtype."""
    probe = _object(raw, file, where, _PROBE_KEYS)
    indices, values = probe.get("indices"), probe.get("values")
    if not isinstance(indices, list) or not isinstance(values, list) or not 0 < len(indices) <= _MAX_PROBES:
        _refuse(file, where, f"expected 1 to {_MAX_PROBES} indices and as many values")
    if len(values) != len(indices):
        _refuse(file, where, f"expected {len(indices)} values, one per index, found {len(values)}")
    for index in indices:
        if not is_int(index) or not 0 <= index < min(numel, 2**62):
            _refuse(file, where, f"probe index {index!r:.30} lies outside the weight's {numel} elements")
    numbers = [_finite(value, file, f"{where}.values") for value in values]
    if any(abs(number) > _FLOAT32_MAX for number in numbers):  # would be inf in float32 and match anything
        _refuse(file, f"{where}.values", "holds a value beyond float32's range")
    dtype = probe.get("dtype", "float32")
    if dtype not in FLOAT_DTYPES:
        _refuse(file, f"{where}.dtype", f"expected one of {list(FLOAT_DTYPES)}, found {dtype!r:.40}")
    return indices, numbers, dtype


def module_fields(raw: object, file: Path, number: int) -> dict:
    """A module entry's fields, each checked; the caller builds the ModuleEntry from them."""
    entry = _object(raw, file, f"module {number}", _ENTRY_KEYS)
    name = string(entry.get("name"), file, f"module {number}.name")
    where = f"module {name!r}"
    sites = entry.get("sites")
    if not isinstance(sites, list) or not all(isinstance(s, str) and s for s in sites):
        _refuse(file, f"{where}.sites", f"expected a list of site names, found {sites!r:.60}")
    shape = entry.get("weight_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
        _refuse(file, f"{where}.weight_shape", f"expected a list of 1 to 4 sizes, found {shape!r:.60}")
    shape = [positive_int(n, file, f"{where}.weight_shape") for n in shape]
    layout = entry.get("layout")
    dims = (
        {"linear": 2, "conv1d": 2, "embedding": 2, "norm": 1}.get(layout) if isinstance(layout, str) else None
    )
    if dims is None:
        _refuse(file, f"{where}.layout", f"unknown layout {layout!r:.40}")
    if len(shape) != dims:
        _refuse(file, f"{where}.weight_shape", f"a {layout} weight has {dims} dimensions, found {shape}")
    out = positive_int(entry.get("out_features"), file, f"{where}.out_features")
    if out != (shape[0] if layout == "linear" else shape[-1]):
        _refuse(file, f"{where}.out_features", f"{out} does not match weight_shape {shape} ({layout})")
    probe = check_probe(entry.get("probe"), math.prod(shape), file, f"{where}.probe")
    return {"name": name, "layout": layout, "sites": tuple(sites), "weight_shape": tuple(shape),
            "out_features": out, "probe": probe, **_deltas(entry, layout, file, where)}  # fmt: skip


def _deltas(entry: dict, layout: str, file: Path, where: str) -> dict:
    """The entry's delta fields: tensor keys (strings), a LoRA's rank and scale, replaced parameters."""
    lora = entry.get("lora")
    if lora is not None:
        lora = _object(lora, file, f"{where}.lora", {"rank", "scale", "down", "up"})
        positive_int(lora.get("rank"), file, f"{where}.lora.rank")
        if lora.get("scale") is not None:
            _finite(lora["scale"], file, f"{where}.lora.scale")
        string(lora.get("down"), file, f"{where}.lora.down")
        string(lora.get("up"), file, f"{where}.lora.up")
    dora = entry.get("dora")
    if dora is not None:
        dora = _object(dora, file, f"{where}.dora", {"magnitude"})
        string(dora.get("magnitude"), file, f"{where}.dora.magnitude")
        if lora is None:
            _refuse(file, f"{where}.dora", "DoRA needs the module's LoRA pair, and it has none")
    keys = {key: string(entry.get(key), file, f"{where}.{key}", optional=True)
            for key in ("bias", "dense", "scale_out", "scale_in")}  # fmt: skip
    replace = _object(entry.get("replace") or {}, file, f"{where}.replace")
    for param, key in replace.items():
        if not PARAMETER_NAME.fullmatch(param):
            _refuse(file, f"{where}.replace", f"{param!r:.40} is not a parameter name")
        string(key, file, f"{where}.replace.{param}")
    route = entry.get("route")
    if route is not None and layout not in ("linear", "conv1d"):
        _refuse(file, f"{where}.route", f"a {layout} module cannot be routed")
    weighted = lora is not None or keys["dense"] or keys["scale_out"] or keys["scale_in"] or route is not None
    if layout == "norm" and weighted:
        _refuse(file, where, "a norm takes only bias and replace entries")
    if layout == "embedding" and (keys["dense"] or keys["scale_out"] or keys["scale_in"]):
        _refuse(file, where, "an embedding takes no dense or IA3 entries")
    if not (weighted or keys["bias"] or replace):
        _refuse(file, where, "changes nothing (no lora, bias, replace, dense or scale entry)")
    return {"lora": lora, "dora": dora, "replace": dict(replace), "route": route, **keys}
