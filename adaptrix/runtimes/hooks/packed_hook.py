"""The hooks of one bundle on one packed parameter: MoE experts and routers as transformers 5 loads them.

A packed parameter (Mixtral's `mlp.experts.gate_up_proj` [E, 2I, H]) is used inside its module's
forward, expert by expert after routing, and a router returns top-k choices, not its product:
no output can be corrected after the fact. So, as PEFT's ParamWrapper does, the module computes
with W + scale * delta: a forward pre-hook puts a new Parameter holding that sum in the
module's parameter dict, and a forward hook (run even when the forward raises) puts the
original back. The original's values never change, and a detached model is the model it was.
Hooks of several bundles nest: each pre-hook adds to what the one before it left, and the
forward hooks are prepended, so they restore in the reverse order.
"""

from __future__ import annotations

import torch

from adaptrix.runtimes.hooks.bundle import Bundle, ModuleEntry

__all__ = ["PackedHook"]


class PackedHook:
    """Adds one bundle's deltas to one packed parameter while its module runs."""

    __slots__ = ("handle", "param", "pieces", "saved")

    def __init__(self, handle, module: torch.nn.Module, entries: list[ModuleEntry], bundle: Bundle):
        self.handle, self.param = handle, entries[0].packed["param"]
        weight = module._parameters[self.param]
        self.pieces = []
        for entry in entries:
            down = bundle.prepared(entry.lora["down"], weight.device, weight.dtype)  # [in, r]
            up = bundle.prepared(entry.lora["up"], weight.device, weight.dtype)  # [r, rows], scale folded
            first, last = entry.packed["rows"]
            self.pieces.append((entry.packed["expert"], first, last, down, up))
        self.saved: list[torch.nn.Parameter] = []

    def register(self, module: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """The pre-hook and the (prepended, always called) forward hook on `module`."""
        return [
            module.register_forward_pre_hook(self.pre),
            module.register_forward_hook(self.post, prepend=True, always_call=True),
        ]

    def pre(self, module: torch.nn.Module, args: tuple) -> None:
        """Swap in W + scale * delta (the W the hooks before this one left)."""
        current = module._parameters[self.param]
        scale = self.handle._scale
        with torch.no_grad():
            summed = current.detach().clone()
            for expert, first, last, down, up in self.pieces:
                if down.device != summed.device:
                    down, up = down.to(summed.device), up.to(summed.device)
                rows = summed if expert is None else summed[expert]
                rows[first:last].add_((down @ up).T, alpha=scale)
        self.saved.append(current)
        module._parameters[self.param] = torch.nn.Parameter(summed, requires_grad=False)

    def post(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        """Put back the parameter the pre-hook found."""
        if self.saved:
            module._parameters[self.param] = self.saved.pop()
