"""The forward hook that adds one bundle's deltas to one module's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (the usual name)

from adaptrix.runtimes.hooks.bundle import Bundle, ModuleEntry
from adaptrix.runtimes.hooks.quantized_weight import plain_dtype, plain_weight
from adaptrix.runtimes.hooks.shared_input import SharedDown

__all__ = ["ModuleHook", "compute_dtype"]


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype deltas are computed in: float32 for half-precision models, as PEFT does."""
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


class ModuleHook:
    """Adds one bundle's deltas to a module's output, and scales its output or input (IA3).

    In order: x @ down @ up (LoRA) with PEFT's DoRA rescaling, x @ dense (LoHa, LoKr), IA3's
    output scale, then the bias delta; `pre` is IA3's input scale, a forward pre-hook.

    The module's own scale (alpha / r, rslora, patterns) is folded into `up` at compile time;
    the handle's live scale multiplies it at each call. DoRA's per-feature factor depends on that
    scale and is recomputed when the scale changes.
    """

    __slots__ = ("bias", "columns", "dense", "device", "down", "embedding", "handle", "layout", "mag_scale",
                 "mag_scale_at", "magnitude", "module", "scale_in", "scale_out", "shared", "up")  # fmt: skip

    def __init__(self, handle, module: torch.nn.Module, entry: ModuleEntry, bundle: Bundle):
        weight = getattr(module, "weight", None)
        reference = weight if weight is not None else next(module.parameters())
        dtype, device = compute_dtype(plain_dtype(reference)), reference.device
        self.handle, self.module, self.layout, self.device = handle, module, entry.layout, device
        self.embedding = entry.layout == "embedding"
        self.down = self.up = self.bias = self.magnitude = self.mag_scale = None
        self.mag_scale_at: float | None = None
        self.shared: SharedDown | None = None  # set by share_inputs: one `x @ down` for q, k, v
        self.columns = slice(None)  # this module's columns of the shared product
        if entry.lora:
            self.down = bundle.prepared(entry.lora["down"], device, dtype)
            self.up = bundle.prepared(entry.lora["up"], device, dtype)
        if entry.dora:
            self.magnitude = bundle.prepared(entry.dora["magnitude"], device, torch.float32)
            self.refresh()
        if entry.bias:
            self.bias = bundle.prepared(entry.bias, device, dtype)
        self.dense = bundle.prepared(entry.dense, device, dtype) if entry.dense else None
        # IA3's vectors stay float32: PEFT scales in the adapter's dtype and casts back.
        self.scale_out = bundle.prepared(entry.scale_out, device, torch.float32) if entry.scale_out else None
        self.scale_in = bundle.prepared(entry.scale_in, device, torch.float32) if entry.scale_in else None

    def refresh(self) -> None:
        """Recompute DoRA's factor m = magnitude / ||W + s B A|| for the handle's current scale."""
        if self.magnitude is None or self.mag_scale_at == self.handle.scale:
            return
        scale = self.handle.scale
        with torch.inference_mode(False), torch.no_grad():
            weight = plain_weight(self.module.weight, self.module).to(torch.float32)
            weight = weight if self.layout == "linear" else weight.T  # as a map [out, in]
            delta_t = self.down.to(torch.float32) @ self.up.to(torch.float32)  # [in, out]
            combined = weight.add(delta_t.T, alpha=scale)
            norm = torch.linalg.vector_norm(combined, dim=1)
            self.mag_scale = (self.magnitude / norm).to(self.down.dtype)
        self.mag_scale_at = scale

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        """The forward hook: return the module's output with this bundle's deltas added."""
        scale = self.handle._scale
        if self.down is not None and (scale != 0.0 or self.magnitude is not None):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.device != self.device:
                self._move(x.device)
            down, shared = self.down, self.shared
            low = shared.low_for(x, down) if shared is not None else None
            if low is not None:
                low = low[..., self.columns]
            elif self.embedding:
                low = F.embedding(x, down)
            else:
                low = (x if x.dtype == down.dtype else x.to(down.dtype)) @ down
            if self.magnitude is not None:
                output = self._add_dora(module, output, low @ self.up, scale)
            elif output.dtype == down.dtype and not output.requires_grad and output.is_contiguous():
                # The common case in one kernel: output += scale * low @ B.T, in place.
                output.view(-1, output.shape[-1]).addmm_(low.view(-1, low.shape[-1]), self.up, alpha=scale)
            else:
                output = _add(output, low @ self.up, scale)
        if self.dense is not None and scale != 0.0:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.device != self.device:
                self._move(x.device)
            dense = self.dense
            output = _add(output, (x if x.dtype == dense.dtype else x.to(dense.dtype)) @ dense, scale)
        if self.scale_out is not None:
            output = _scaled(output, self.scale_out, scale)
        if self.bias is not None:
            output = _add(output, self.bias, 1.0)
        return output

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The forward pre-hook of an input scale (IA3's feedforward modules): scale the input."""
        if args:
            return (_scaled(args[0], self.scale_in, self.handle._scale, copy=True), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: _scaled(kwargs[key], self.scale_in, self.handle._scale, copy=True)}

    def _add_dora(self, module, output: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        """PEFT's DoRA: m * (W x) + bias + m * s * B A x, given output = W x + bias."""
        m = self.mag_scale  # kept current by Handle.scale's setter
        result = output.to(m.dtype)
        if self.embedding:
            extra = (m - 1) * result + (m * scale) * delta
        else:
            bias = getattr(module, "bias", None)
            base = result if bias is None else result - bias.to(m.dtype)
            extra = (m - 1) * base + (m * scale) * delta
        return _add(output, extra, 1.0)

    def _move(self, device: torch.device) -> None:
        """Follow the module to another device (the model was moved after attaching)."""
        for name in ("down", "up", "bias", "magnitude", "mag_scale", "dense", "scale_out", "scale_in"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.shared is not None and self.shared.down.device != device:
            self.shared.move(device)
        self.device = device


def _add(output: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """Return output + scale * delta: in place when no gradient flows through the output."""
    if delta.dtype != output.dtype:
        delta = delta.to(output.dtype)
    if output.requires_grad:
        return torch.add(output, delta, alpha=scale)
    return output.add_(delta, alpha=scale)


def _scaled(value: torch.Tensor, vector: torch.Tensor, scale: float, copy: bool = False) -> torch.Tensor:
    """The value times 1 + scale * (vector - 1) along its last axis, in float32 as PEFT's IA3 does."""
    if vector.device != value.device:
        vector = vector.to(value.device)
    factor = vector if scale == 1.0 else 1.0 + scale * (vector - 1.0)
    if value.dtype != factor.dtype:
        return (value.to(factor.dtype) * factor).to(value.dtype)
    if copy or value.requires_grad:
        return value * factor
    return value.mul_(factor)
