"""The forward hook that adds one bundle's deltas to one module's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (the usual name)

from adaptrix.runtime.bundle import Bundle, ModuleEntry

__all__ = ["ModuleHook", "compute_dtype"]


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype deltas are computed in: float32 for half-precision models, as PEFT does."""
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


class ModuleHook:
    """Adds scale * B @ A @ x (LoRA), PEFT's DoRA rescaling and a bias delta to a module's output.

    The module's own scale (alpha / r, rslora, patterns) is folded into B when attached; the
    handle's live scale multiplies it at each call. DoRA's per-feature factor depends on that
    scale and is recomputed when the scale changes.
    """

    __slots__ = ("a", "b_t", "bias", "device", "embedding", "handle", "layout", "mag_scale", "mag_scale_at",
                 "magnitude", "module")  # fmt: skip

    def __init__(self, handle, module: torch.nn.Module, entry: ModuleEntry, bundle: Bundle):
        weight = getattr(module, "weight", None)
        reference = weight if weight is not None else next(module.parameters())
        dtype, device = compute_dtype(reference.dtype), reference.device
        self.handle, self.module, self.layout, self.device = handle, module, entry.layout, device
        self.embedding = entry.layout == "embedding"
        self.a = self.b_t = self.bias = self.magnitude = self.mag_scale = None
        self.mag_scale_at: float | None = None
        if entry.lora:
            # An embedding gathers rows of A.T; B is kept as B.T, contiguous, for one fast addmm.
            self.a = bundle.prepared(entry.lora["A"], device, dtype, transposed=self.embedding)
            scale = float(entry.lora["scale"])
            self.b_t = bundle.prepared(entry.lora["B"], device, dtype, scale, transposed=True)
        if entry.dora:
            self.magnitude = bundle.prepared(entry.dora["magnitude"], device, torch.float32)
            self.refresh()
        if entry.bias:
            self.bias = bundle.prepared(entry.bias, device, dtype)

    def refresh(self) -> None:
        """Recompute DoRA's factor m = magnitude / ||W + s B A|| for the handle's current scale."""
        if self.magnitude is None or self.mag_scale_at == self.handle.scale:
            return
        scale = self.handle.scale
        with torch.inference_mode(False), torch.no_grad():
            weight = self.module.weight.to(torch.float32)
            weight = weight if self.layout == "linear" else weight.T  # as a map [out, in]
            a = self.a.T if self.embedding else self.a
            combined = torch.addmm(weight, self.b_t.T.to(torch.float32), a.to(torch.float32), alpha=scale)
            norm = torch.linalg.vector_norm(combined, dim=1)
            self.mag_scale = (self.magnitude / norm).to(self.a.dtype)
        self.mag_scale_at = scale

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        """The forward hook: return the module's output with this bundle's deltas added."""
        scale = self.handle._scale
        if self.a is not None and (scale != 0.0 or self.magnitude is not None):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.device != self.device:
                self._move(x.device)
            a = self.a
            if self.embedding:
                low = F.embedding(x, a)
            else:
                low = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)
            if self.magnitude is not None:
                output = self._add_dora(module, output, low @ self.b_t, scale)
            elif output.dtype == a.dtype and not output.requires_grad and output.is_contiguous():
                # The common case in one kernel: output += scale * low @ B.T, in place.
                output.view(-1, output.shape[-1]).addmm_(low.view(-1, low.shape[-1]), self.b_t, alpha=scale)
            else:
                output = _add(output, low @ self.b_t, scale)
        if self.bias is not None:
            output = _add(output, self.bias, 1.0)
        return output

    def _add_dora(self, module, output: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        """PEFT's DoRA: m * (W x) + bias + m * s * B A x, given output = W x + bias."""
        if self.mag_scale_at != scale:
            self.refresh()
        m = self.mag_scale
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
        for name in ("a", "b_t", "bias", "magnitude", "mag_scale"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self.device = device


def _add(output: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """Return output + scale * delta: in place when no gradient flows through the output."""
    if delta.dtype != output.dtype:
        delta = delta.to(output.dtype)
    if output.requires_grad:
        return torch.add(output, delta, alpha=scale)
    return output.add_(delta, alpha=scale)
