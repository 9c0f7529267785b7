"""Does a bundle fit a model? Every check runs before the model is touched."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from adaptrix.artifacts import find_module
from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.hooks.bottleneck import BottleneckEntry
from adaptrix.runtimes.hooks.bundle import Bundle, ModuleEntry
from adaptrix.runtimes.hooks.quantized_weight import plain_dtype, plain_shape, plain_weight

__all__ = ["find_module", "fit_bottlenecks", "fit_modules"]

_FIX = "compile the adapter against this model's base (adaptrix compile ADAPTER --base BASE --target hooks)"
# Largest relative rounding error of each dtype: a probe passes through at most two of them.
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-52}
_PROBE_ATOL = 1e-7  # float16 subnormals
_PROBED_MODULES = 8  # modules whose weights are probed: spread over the model, enough to tell bases apart


def fit_modules(
    model: torch.nn.Module,
    bundle: Bundle,
    original: Callable[[torch.nn.Module, str], torch.Tensor | None],
) -> list[tuple[ModuleEntry, torch.nn.Module]]:
    """The model's module for each bundle entry, after checking that the bundle was made for it.

    `original(module, param)` gives a parameter as it was before other bundles replaced it.
    """
    _check_config(model, bundle)
    modules = dict(model.named_modules())
    probed = set(_spread(len(bundle.modules), _PROBED_MODULES))
    found = []
    for number, entry in enumerate(bundle.modules):
        if entry.packed is not None:
            found.append((entry, _fit_packed(model, bundle, entry, modules, number in probed)))
            continue
        module = find_module(model, entry.name, modules)
        if module is None:
            _refuse(bundle, f"the model has no module {entry.name!r} ({', '.join(entry.sites)})")
        weight = original(module, "weight")
        if weight is None:
            weight = getattr(module, "weight", None)
        _check_layout(bundle, entry, module, weight)
        _check_replaced(bundle, entry, module, original)
        if number in probed:
            _check_probe(bundle, entry, weight, module)
        found.append((entry, module))
    return found


def _fit_packed(model, bundle: Bundle, entry: ModuleEntry, modules: dict, probe: bool) -> torch.nn.Module:
    """The loaded module holding a packed weight, checked: its parameter's rows have the weight's shape."""
    packed = entry.packed
    module = find_module(model, packed["module"], modules)
    param = module._parameters.get(packed["param"]) if module is not None else None
    if param is None:
        _refuse(bundle, f"the model has no parameter {packed['module']}.{packed['param']} "
                        f"({', '.join(entry.sites)})")  # fmt: skip
    expert, (first, last) = packed["expert"], packed["rows"]
    weight = param if expert is None else param[expert] if expert < param.shape[0] else None
    if weight is None or weight.dim() != 2 or last > weight.shape[0]:
        _refuse(bundle, f"{packed['module']}.{packed['param']} {list(param.shape)} holds no expert {expert} "
                        f"rows {first}..{last}")  # fmt: skip
    weight = weight[first:last]
    if list(weight.shape) != list(entry.weight_shape):
        _refuse(bundle, f"{entry.name}.weight is {list(weight.shape)} in {packed['module']}."
                        f"{packed['param']}, expected {list(entry.weight_shape)}")  # fmt: skip
    if probe:
        _check_probe(bundle, entry, weight, module)
    return module


def _spread(count: int, most: int) -> list[int]:
    """Up to `most` indices spread evenly over range(count), first and last included."""
    if count <= most:
        return list(range(count))
    return [round(i * (count - 1) / (most - 1)) for i in range(most)]


def _check_config(model: torch.nn.Module, bundle: Bundle) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    base = bundle.base
    model_type = getattr(config, "model_type", None)
    if model_type is not None and model_type != base["model_type"]:
        _refuse(bundle, f"it was compiled for a {base['model_type']} model, this one is {model_type}")
    differ = {
        key: (expected, value)
        for key, expected in base.get("config", {}).items()
        if (value := getattr(config, key, None)) is not None and value != expected
    }
    if differ:
        compiled = ", ".join(f"{key}={expected}" for key, (expected, _) in differ.items())
        found = ", ".join(f"{key}={value}" for key, (_, value) in differ.items())
        _refuse(bundle, f"it was compiled for {compiled}; this model has {found}")


def _check_layout(bundle: Bundle, entry: ModuleEntry, module: torch.nn.Module, weight) -> None:
    kind = type(module).__name__
    expected_kind = {"linear": "Linear", "conv1d": "Conv1D", "embedding": "Embedding"}.get(entry.layout)
    if expected_kind is not None and not _is_kind(module, expected_kind):
        _refuse(bundle, f"{entry.name} is a {kind} here, the bundle expects a {expected_kind}")
    shape = None if weight is None else plain_shape(weight)
    if shape != entry.weight_shape:
        found, expected = list(shape or []), list(entry.weight_shape)
        _refuse(bundle, f"{entry.name}.weight has shape {found}, expected {expected}")


def _check_replaced(bundle: Bundle, entry: ModuleEntry, module: torch.nn.Module, original: Callable) -> None:
    """Each parameter the entry replaces exists on the module, with the shape of the bundle's tensor."""
    for name, key in entry.replace.items():
        current = original(module, name)
        current = current if current is not None else module._parameters.get(name)
        if current is None:
            _refuse(bundle, f"{entry.name} has no parameter {name!r} to replace")
        shape, expected = list(bundle.tensors[key].shape), list(current.shape)
        if shape != expected:
            _refuse(bundle, f"{entry.name}.{name} has shape {expected}, the bundle's replacement {shape}")


def _is_kind(module: torch.nn.Module, kind: str) -> bool:
    if kind == "Linear":
        return isinstance(module, torch.nn.Linear)
    if kind == "Embedding":
        return isinstance(module, torch.nn.Embedding)
    return type(module).__name__ == kind


def _rtol(found: torch.dtype, stored: torch.dtype) -> float:
    """How far a probed value may be from the bundle's: two roundings, in the coarser of the dtypes."""
    return 2 * max(_EPS.get(found, _EPS[torch.bfloat16]), _EPS.get(stored, _EPS[torch.bfloat16]))


def _check_probe(bundle: Bundle, entry: ModuleEntry, weight: torch.Tensor, module: torch.nn.Module) -> None:
    """A few of the base's weight values must be this model's, up to rounding between dtypes."""
    with torch.no_grad():
        values = plain_weight(weight, module).detach().reshape(-1)
        found = values[entry.probe_at.to(weight.device)].to("cpu", torch.float32)
    stored = entry.probe_values
    stored_dtype = getattr(torch, entry.probe_dtype, torch.float32)
    rtol = _rtol(plain_dtype(weight), stored_dtype)
    if not bool(((found - stored).abs() <= rtol * stored.abs() + _PROBE_ATOL).all()):
        _refuse(
            bundle,
            f"{entry.name}.weight holds other values than the base it was compiled for "
            "(another checkpoint of the same shape)",
        )


def _refuse(bundle: Bundle, reason: str) -> None:
    raise BadInputError(f"does not fit this model: {reason}; the model was left unchanged", path=bundle.path,
                        fix=_FIX)  # fmt: skip


def fit_bottlenecks(
    model: torch.nn.Module,
    bundle: Bundle,
    original: Callable[[torch.nn.Module, str], torch.Tensor | None],
) -> list[tuple[BottleneckEntry, dict[str, torch.nn.Module]]]:
    """The model's modules for each bottleneck entry, after checking they are the ones it was made for."""
    if not bundle.bottlenecks:
        return []
    _check_config(model, bundle)
    modules = dict(model.named_modules())
    probed = set(_spread(len(bundle.bottlenecks), _PROBED_MODULES))
    found = []
    for number, entry in enumerate(bundle.bottlenecks):
        named = {}
        for key in ("block", "output", "residual", "norm", "projection"):
            name = entry.modules.get(key)
            if name is None:
                continue
            module = find_module(model, name, modules)
            if module is None:
                _refuse(bundle, f"the model has no module {name!r} ({', '.join(entry.sites)})")
            named[key] = module
        _check_residual_arg(bundle, entry, named["residual"])
        if next(named["block"].parameters(), None) is None:
            _refuse(bundle, f"{entry.modules['block']} has no parameters to tell its device and dtype")
        norm = named.get("norm")
        if norm is not None and not isinstance(norm, torch.nn.LayerNorm):
            _refuse(
                bundle,
                f"{entry.modules['norm']} is a {type(norm).__name__} here, the bundle expects a LayerNorm",
            )
        projection = named["projection"]
        weight = original(projection, "weight")
        weight = weight if weight is not None else getattr(projection, "weight", None)
        shape = None if weight is None else list(plain_shape(weight))
        if shape != entry.probe["shape"]:
            _refuse(
                bundle,
                f"{entry.modules['projection']}.weight has shape {shape}, expected {entry.probe['shape']}",
            )
        if number in probed:
            _check_probe_values(bundle, entry.modules["projection"], weight, entry.probe, projection)
        found.append((entry, named))
    return found


def _check_residual_arg(bundle: Bundle, entry: BottleneckEntry, module: torch.nn.Module) -> None:
    """The residual is read from argument `residual_arg` of the module's forward: it must have one."""
    index = entry.modules["residual_arg"]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    if index >= len(params):
        name = entry.modules["residual"]
        _refuse(bundle, f"{name}'s forward takes {len(params)} arguments, the bundle reads argument {index}")


def _check_probe_values(
    bundle: Bundle, name: str, weight: torch.Tensor, probe: dict, module: torch.nn.Module
) -> None:
    """A bottleneck's probe of the projection it follows, checked like a module's."""
    stored_dtype = getattr(torch, probe.get("dtype", "float32"), torch.float32)
    at = torch.tensor(probe["indices"], dtype=torch.long)
    stored = torch.tensor(probe["values"], dtype=torch.float32)
    with torch.no_grad():
        values = plain_weight(weight, module).detach().reshape(-1)
        found = values[at.to(weight.device)].to("cpu", torch.float32)
    rtol = _rtol(plain_dtype(weight), stored_dtype)
    if not bool(((found - stored).abs() <= rtol * stored.abs() + _PROBE_ATOL).all()):
        _refuse(bundle, f"{name}.weight holds other values than the base it was compiled for "
                        "(another checkpoint of the same shape)")  # fmt: skip
