"""attach / detach / switch: hook bundles onto a plain PyTorch model and take them off again.

Attaching never changes a parameter's values: deltas are added to module outputs by forward
hooks, a packed parameter (transformers 5's MoE experts) is swapped for W + delta while its
module runs (packed_hook.py), and a replaced module's parameters (PEFT modules_to_save) are
swapped for new Parameter objects whose originals are put back on detach. So a detached model
is bit for bit the model it was, state_dict included.
"""

from __future__ import annotations

import logging
import math
import weakref
from pathlib import Path

import torch

from adaptrix.ir.errors import AdaptrixError, BadInputError
from adaptrix.runtimes.hooks.bottleneck import BottleneckHook
from adaptrix.runtimes.hooks.bundle import Bundle, ModuleEntry, load_bundle
from adaptrix.runtimes.hooks.fit import fit_bottlenecks, fit_modules
from adaptrix.runtimes.hooks.module_hook import ModuleHook, compute_dtype
from adaptrix.runtimes.hooks.packed_hook import PackedHook
from adaptrix.runtimes.hooks.quantized_weight import plain_dtype
from adaptrix.runtimes.hooks.route_hook import group_routes
from adaptrix.runtimes.hooks.shared_input import share_inputs

__all__ = ["Handle", "attach", "attached", "switch"]

logger = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, list[Handle]] = weakref.WeakKeyDictionary()


class Handle:
    """One bundle attached to one model: `scale` is live, `detach()` takes it off."""

    def __init__(self, model: torch.nn.Module, bundle: Bundle, scale: float):
        self._model = weakref.ref(model)
        self.bundle = bundle
        self._scale = float(scale)
        self._hooks: list[ModuleHook] = []
        self._removers: list[torch.utils.hooks.RemovableHandle] = []
        self._swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []

    @property
    def model(self) -> torch.nn.Module | None:
        """The model the bundle is attached to (None once that model is gone)."""
        return self._model()

    @property
    def scale(self) -> float:
        """The factor every delta of this bundle is multiplied by (1.0: as trained)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = _finite_scale(value)
        for hook in self._hooks:
            hook.refresh()

    @property
    def attached(self) -> bool:
        """Whether the bundle is still attached."""
        model = self.model
        return model is not None and self in _ATTACHED.get(model, ())

    def detach(self) -> None:
        """Remove the hooks and put back every replaced parameter; a second call does nothing."""
        for remover in self._removers:
            remover.remove()
        for module, name, original in reversed(self._swapped):
            module._parameters[name] = original
        self._removers, self._swapped, self._hooks = [], [], []
        model = self.model
        handles = _ATTACHED.get(model, []) if model is not None else []
        if self in handles:
            handles.remove(self)
        logger.debug("detached %s", self.bundle.path)

    def original(self, module: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
        """The parameter this handle replaced on `module`, if it replaced one."""
        return next((p for m, n, p in self._swapped if m is module and n == name), None)

    def __enter__(self) -> Handle:
        """Use as a context manager: detached on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Detach."""
        self.detach()

    def __repr__(self) -> str:
        """`Handle(bundle path, scale, attached)`."""
        return f"Handle({str(self.bundle.path)!r}, scale={self._scale}, attached={self.attached})"

    def _apply(
        self, fitted: list[tuple[ModuleEntry, torch.nn.Module]], bottlenecks: list | None = None
    ) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for entry, modules in bottlenecks or []:
                hook = BottleneckHook(self, entry, self.bundle, modules)
                self._removers.extend(hook.register(modules))
            packed: dict[tuple[int, str], list] = {}
            for entry, module in fitted:
                if entry.packed is not None:
                    packed.setdefault((id(module), entry.packed["param"]), [module]).append(entry)
            for module, *entries in packed.values():
                self._removers.extend(PackedHook(self, module, entries, self.bundle).register(module))
            hooked, routed = [], []
            for entry, module in fitted:
                if entry.packed is not None:
                    continue
                for name, key in entry.replace.items():
                    self._swap(module, name, self.bundle.tensors[key])
                if entry.route:
                    routed.append((entry, module))
                if entry.lora or entry.bias or entry.dense or entry.scale_out or entry.scale_in:
                    hook = ModuleHook(self, module, entry, self.bundle)
                    self._hooks.append(hook)
                    hooked.append((entry, hook))
                    self._removers.append(module.register_forward_hook(hook, with_kwargs=True))
                    if entry.scale_in:
                        self._removers.append(module.register_forward_pre_hook(hook.pre, with_kwargs=True))
            share_inputs(hooked, self.bundle)
            for hook, module in group_routes(self, routed, self.bundle, _device_dtype):
                self._removers.append(module.register_forward_hook(hook, with_kwargs=True))

    def _swap(self, module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
        current = module._parameters[name]
        new = torch.nn.Parameter(value.to(current.device, current.dtype), requires_grad=False)
        self._swapped.append((module, name, current))
        module._parameters[name] = new


def attach(model: torch.nn.Module, bundle: Path | str | Bundle, scale: float = 1.0) -> Handle:
    """Attach a hooks bundle to `model`; bundles attached together add up."""
    return _attach(model, bundle, scale, keep=_ATTACHED.get(model, []))


def switch(model: torch.nn.Module, bundle: Path | str | Bundle, scale: float = 1.0) -> Handle:
    """Replace every bundle attached to `model` by this one (checked first: a misfit changes nothing)."""
    return _attach(model, bundle, scale, keep=[])


def attached(model: torch.nn.Module) -> list[Handle]:
    """The handles attached to `model`, in the order they were attached."""
    return list(_ATTACHED.get(model, []))


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a routed module's deltas live and the dtype they are computed in."""
    reference = next(module.parameters())
    return reference.device, compute_dtype(plain_dtype(reference))


def _finite_scale(value: object) -> float:
    """A handle's scale: a finite number (NaN or inf would silently fill every output with NaN)."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale):
        raise BadInputError(
            f"scale {value!r:.40} is not a finite number", fix="pass a scale such as 0.5 or 1.0"
        )
    return scale


def _attach(model: torch.nn.Module, bundle: Path | str | Bundle, scale: float, keep: list[Handle]) -> Handle:
    scale = _finite_scale(scale)
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    current = list(_ATTACHED.get(model, []))

    def original(module: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
        return next((p for h in current if (p := h.original(module, name)) is not None), None)

    fitted = fit_modules(model, bundle, original)
    bottlenecks = fit_bottlenecks(model, bundle, original)
    _check_replacements(bundle, fitted, keep)
    saved = _Saved(model, current)
    try:
        for handle in current:
            if handle not in keep:
                handle.detach()
        handle = Handle(model, bundle, scale)
        handle._apply(fitted, bottlenecks)
        _ATTACHED.setdefault(model, []).append(handle)
    except BaseException as exc:  # any failure: the model goes back to what it was, then the error is raised
        saved.restore()
        if isinstance(exc, Exception) and not isinstance(exc, AdaptrixError):
            reason = " ".join(str(exc).split())[:200]
            message = f"cannot be attached ({type(exc).__name__}: {reason}); the model was left unchanged"
            raise BadInputError(message, path=bundle.path) from exc
        raise
    logger.debug("attached %s to %d modules", bundle.path, len(fitted))
    return handle


class _Saved:
    """What attaching may change, saved so that a failure puts it back exactly.

    Each module's hook dicts and parameter dict (restored in place: the removers of the handles
    still attached keep working), the model's list of handles and those handles' own records.
    """

    def __init__(self, model: torch.nn.Module, handles: list[Handle]):
        self.model, self.handles = model, list(handles)
        self.modules = [(module, [(d, d.copy()) for d in _hook_dicts(module)]) for module in model.modules()]
        self.records = [(h, list(h._removers), list(h._swapped), list(h._hooks)) for h in handles]

    def restore(self) -> None:
        """Put every saved dict, list and record back."""
        for _, saved in self.modules:
            for live, copy in saved:
                live.clear()
                live.update(copy)
        for handle, removers, swapped, hooks in self.records:
            handle._removers, handle._swapped, handle._hooks = removers, swapped, hooks
        if self.handles:
            _ATTACHED[self.model] = list(self.handles)
        else:
            _ATTACHED.pop(self.model, None)


def _hook_dicts(module: torch.nn.Module) -> list:
    """The module's parameter dict and every forward hook dict torch keeps on it."""
    names = ("_parameters", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")  # fmt: skip
    return [found for name in names if (found := getattr(module, name, None)) is not None]


def _check_replacements(bundle: Bundle, fitted: list, keep: list[Handle]) -> None:
    """Two attached bundles may not both replace the same parameter."""
    for entry, module in fitted:
        for name in entry.replace:
            other = next((h for h in keep if h.original(module, name) is not None), None)
            if other is not None:
                raise BadInputError(
                    f"replaces {entry.name}.{name}, which the attached bundle {other.bundle.path} "
                    "replaces too; the model was left unchanged",
                    path=bundle.path,
                    fix="detach the other bundle first, or use adaptrix.switch",
                )
