"""Bottleneck adapters at run time: AdapterHub's SeqBn / DoubleSeqBn / ParBn as forward hooks.

An entry hooks three places of one layer (checkpoint names in the bundle): the residual r, read
from argument `residual_arg` of `residual`'s forward (a pre-hook); the block's output h, read
from `output`'s forward (the block itself for Llama, BERT's dropout after the dense); and the
`block`, whose output gains final(h, r) - base(h, r): base is what the layer computes anyway
(h + r, or LN(h + r) with the layer's `norm`), final what AdapterHub computes with the adapter
(`adaptrix.ir.bottleneck` has the formulas). Llama's block returns h and adds r after;
BERT's returns LN(h + r): either way the layer then carries AdapterHub's result.

The handle's scale s multiplies the bottleneck branch, scale * up(act(down(x))), before any
residual or norm: s = 0 is the base exactly when the adapter has no layer norm of its own after
the branch (ln_after), and s = 1 is the adapter as trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (the usual name)

from adaptrix.runtimes.hooks.activations import activation
from adaptrix.runtimes.hooks.bottleneck_entry import (
    BottleneckEntry,
    check_bottleneck_tensors,
    parse_bottleneck,
)

__all__ = ["BottleneckEntry", "BottleneckHook", "check_bottleneck_tensors", "parse_bottleneck"]


class BottleneckHook:
    """The three hooks of one bottleneck on one model (see the module docstring)."""

    def __init__(self, handle, entry: BottleneckEntry, bundle, modules: dict[str, torch.nn.Module]):
        self.handle, self.entry = handle, entry
        self.norm = modules.get("norm")
        self.separate_output = modules["output"] is not modules["block"]
        reference = next(modules["block"].parameters())
        self.device = reference.device
        self.dtype = torch.float32 if reference.dtype in (torch.float16, torch.bfloat16) else reference.dtype
        self.t = {name: bundle.prepared(key, self.device, self.dtype) for name, key in entry.tensors.items()}
        self.act = activation(entry.act)
        self.branch_input = _branch_only(entry) if self.norm is None else None
        self._h: torch.Tensor | None = None
        self._r: torch.Tensor | None = None

    def register(self, modules: dict[str, torch.nn.Module]) -> list:
        """Register the hooks; return their removers."""
        removers = [modules["residual"].register_forward_pre_hook(self.read_residual, with_kwargs=True)]
        if self.separate_output:
            removers.append(modules["output"].register_forward_hook(self.read_output))
        removers.append(modules["block"].register_forward_hook(self.add_adapter))
        return removers

    def read_residual(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook: keep the residual r."""
        index = self.entry.modules["residual_arg"]
        self._r = args[index] if index < len(args) else list(kwargs.values())[index - len(args)]

    def read_output(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Hook on the module whose output is h (BERT's dropout after the dense)."""
        self._h = output

    def add_adapter(self, module: torch.nn.Module, args: tuple, output):
        """Hook on the block: its output gains final(h, r) - base(h, r)."""
        first = output[0] if isinstance(output, tuple) else output
        h = self._h if self.separate_output else first
        r, self._h, self._r = self._r, None, None
        if h is None or r is None:
            raise RuntimeError(
                f"adaptrix: bottleneck {self.entry.name} ran without its residual or output; "
                "the model does not call its modules as the bundle expects"
            )
        if h.device != self.device:
            self._move(h.device)
        h32, r32 = h.to(self.dtype), r.to(self.dtype)
        if self.branch_input is not None:  # final - base is the branch alone (Llama, no norms)
            x = {"h": h32, "r": r32}.get(self.branch_input)
            delta = self.branch(h32 + r32 if x is None else x)
        else:
            delta = self.final(h32, r32) - self.layer_norm(h32 + r32)
        changed = first + delta.to(first.dtype)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's own norm (BERT), or nothing (Llama)."""
        norm = self.norm
        if norm is None:
            return x
        weight = None if norm.weight is None else norm.weight.to(x.dtype)
        bias = None if norm.bias is None else norm.bias.to(x.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def _own_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.entry.ln_eps:
            return x
        t = self.t
        return F.layer_norm(
            x, x.shape[-1:], t[f"ln_{name}_weight"], t[f"ln_{name}_bias"], self.entry.ln_eps[name]
        )

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """Scale * up(act(down(ln_before(x)))), times the handle's live scale."""
        t = self.t
        down = F.linear(self._own_norm("before", x), t["down"], t.get("down_bias"))
        up = F.linear(self.act(down), t["up"], t.get("up_bias")) * self.entry.scale
        live = self.handle._scale
        return up if live == 1.0 else up * live

    def final(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """What AdapterHub's bottleneck layer returns for block output h and residual r."""
        e = self.entry
        if e.parallel:
            out = self._own_norm("after", self.branch(r)) + h
        else:
            joined = h + r if e.original_ln_before else None
            x = self.layer_norm(joined) if joined is not None else h
            res = h if e.residual_before_ln is True else (joined if e.residual_before_ln == "post_add" else x)
            y = self.branch(x)
            if e.adapter_residual_before_ln:
                out = self._own_norm("after", y + res)
            else:
                out = self._own_norm("after", y) + res
        return self.layer_norm(out + r) if e.original_ln_after else out

    def _move(self, device: torch.device) -> None:
        """Follow the model to another device."""
        self.t = {name: value.to(device) for name, value in self.t.items()}
        self.device = device


def _branch_only(entry: BottleneckEntry) -> str | None:
    """The branch's input ("h", "r", "h+r") when, without norms, final(h, r) - (h + r) is the branch.

    `final` is then branch(x) + res (+ r when original_ln_after), res and x each h, r or h + r;
    the rest cancels when it sums to h + r. Otherwise None.
    """
    if entry.ln_eps:
        return None
    joined = (1, 1) if entry.original_ln_before else None
    if entry.parallel:
        x, res = "r", (1, 0)
    else:
        x = "h+r" if joined else "h"
        choice = {True: (1, 0), "post_add": joined}
        res = choice.get(entry.residual_before_ln, joined or (1, 0))
    if res is None:
        return None
    rest = (res[0], res[1] + int(entry.original_ln_after))
    return x if rest == (1, 1) else None
