"""One `x @ down` for the modules of a layer that read the same input: q, k, v; gate and up.

A decode step runs every LoRA as two small matmuls whose cost is mostly per kernel, not per
byte. The q, k and v projections of a layer are called on the same tensor, and so are gate
and up, so their `down` matrices are concatenated and the first of them to run computes
`x @ [down_q | down_k | down_v]` once; the others take their columns of it. Sharing rests on
the input being the very same tensor, unchanged (same object and version counter): anything
else computes on its own, and a group whose members ever see different inputs (a model where
k and v read other states than q) stops sharing for good.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["SharedDown", "share_inputs"]

# Roles whose modules read one input in the families Adaptrix binds, by the name of that input.
_INPUTS = {"attn_q": "attn", "attn_k": "attn", "attn_v": "attn", "mlp_gate": "mlp", "mlp_up": "mlp"}


class SharedDown:
    """The concatenated `down` of a group of hooks, and the last input's product with it."""

    __slots__ = ("down", "hooks", "low", "pending", "version", "x")

    def __init__(self, hooks: list, down: torch.Tensor) -> None:
        self.hooks = hooks
        self.down = down
        start = 0
        for hook in hooks:
            rank = hook.down.shape[1]
            hook.shared, hook.columns = self, slice(start, start + rank)
            start += rank
        self.x = self.low = self.version = None
        self.pending = 0

    def low_for(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor | None:
        """`x @ down` for the whole group (None once the group has stopped sharing)."""
        version = None if x.is_inference() else x._version
        if x is self.x and version == self.version:
            self.pending -= 1
            low = self.low
            if self.pending <= 0:
                self.x = self.low = None  # drop the references: activations are not kept
            return low
        if self.pending > 0:  # a member expected this group's input and got another one
            self.stop()
            return None
        self.low = (x if x.dtype == down.dtype else x.to(down.dtype)) @ self.down
        self.x, self.version, self.pending = x, version, len(self.hooks) - 1
        return self.low

    def stop(self) -> None:
        """Each member computes its own product from now on."""
        for hook in self.hooks:
            hook.shared = None
        self.x = self.low = None

    def move(self, device: torch.device) -> None:
        """Follow the members to another device."""
        self.down = self.down.to(device)
        self.x = self.low = None
        self.pending = 0


def share_inputs(entries_and_hooks: list[tuple[object, object]], bundle) -> None:
    """Group the LoRA hooks of single-role modules that read one input, one group per layer.

    The concatenated `down` of a group is made once per bundle, device and dtype (like the
    bundle's prepared tensors), so attaching or switching to a bundle again does not redo it.
    """
    groups: dict[tuple[str, str, object, object], list] = defaultdict(list)
    for entry, hook in entries_and_hooks:
        if hook.down is None or hook.embedding or len(entry.sites) != 1:
            continue
        layer, _, role = entry.sites[0].rpartition(" ")
        if role in _INPUTS and layer:
            groups[(layer, _INPUTS[role], hook.down.dtype, hook.device)].append((entry, hook))
    for (_, _, dtype, device), members in groups.items():
        if len(members) > 1:
            key = ("shared down", tuple(entry.lora["down"] for entry, _ in members), str(device), dtype)
            down = bundle.derived(key, lambda members=members: torch.cat([h.down for _, h in members], dim=1))
            SharedDown([hook for _, hook in members], down)
