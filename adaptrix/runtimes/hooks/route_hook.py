"""The hooks of routed modules (`--pass route`, PEFT's Arrow): one product per group of modules.

A decode step of a small model costs per torch op, not per byte, so a routed module's work takes
as few ops as it can. Its joint [P.T | -P.T | down_1 ... down_A] (each down zero-padded to the
group's largest rank R; W = A * (2 + R) columns) gives in one matmul every signed score, its
negative and every low-rank code. Top_k 1: the argmax over [s | -s] is the adapter with the
largest |s| (index mod A), and one row lookup in a 0/1 table [2A, W] keeps that adapter's codes
(the softmax of one score is 1); a larger top_k multiplies the codes by Arrow's softmax
coefficients. The masked row goes into one addmm with [0 | up_1 ... up_A] (zero rows for the
scores, each up with its adapter's scale folded in). q, k and v (and gate and up) read one
input, so, like shared_input.py's groups, the first of them to run computes the whole group's
product and mask; the others take their part of it, only while they get the very same tensor
(same object, same version counter).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from adaptrix.runtimes.hooks.route import arrow_coefficients_of

__all__ = ["RouteGroup", "RouteHook", "group_routes"]

# Roles whose modules read one input in the families Adaptrix binds (as shared_input.py's).
_INPUTS = {"attn_q": "attn", "attn_k": "attn", "attn_v": "attn", "mlp_gate": "mlp", "mlp_up": "mlp"}


def _padded(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """The tensor with zeros appended along `dim` up to `size`."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


class RouteHook:
    """The forward hook of a routed module: adds scale * (its group's mix of codes) @ up to the output."""

    __slots__ = ("entry", "group", "handle", "number", "own", "up", "up3")

    def __init__(self, handle, entry, bundle, device: torch.device, dtype: torch.dtype, rank: int):
        self.handle, self.entry = handle, entry
        route, key = entry.route, ("route", entry.name, str(device), dtype, rank)
        self.up = bundle.derived((*key, "up"), lambda: _up(route, bundle, device, dtype, rank))
        self.own = bundle.derived((*key, "joint"), lambda: _joint(route, bundle, device, dtype, rank))
        self.up3 = self.up.unsqueeze(0)  # [1, W, out]: a batch of one for baddbmm_
        self.group: RouteGroup | None = None
        self.number = 0  # this module's place in its group

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        """The forward hook: output + scale * sum_e coeff_e * x @ down_e @ up_e."""
        scale = self.handle._scale
        if scale == 0.0:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        group = self.group
        if x.device != group.device:
            group.move(x.device)
        mixed = group.mixed(x, self)  # x's shape but the last axis: [..., W]
        if output.dtype != mixed.dtype or output.requires_grad or not output.is_contiguous():
            return torch.add(output, (mixed @ self.up).to(output.dtype), alpha=scale)
        if mixed.dim() == 3:  # [batch, tokens, W]: no view to make
            batch = mixed.shape[0]
            up = self.up3 if batch == 1 else self.up3.expand(batch, -1, -1)
            return output.baddbmm_(mixed, up, alpha=scale)
        output.view(-1, output.shape[-1]).addmm_(mixed.reshape(-1, mixed.shape[-1]), self.up, alpha=scale)
        return output


class RouteGroup:
    """Routed modules that read one input: their joint [in, G * W] and the last input's mix."""

    __slots__ = ("adapters", "device", "hooks", "joint", "mix", "pending", "sharing", "table", "temperature",
                 "top_k", "version", "width", "x")  # fmt: skip

    def __init__(self, hooks: list[RouteHook], joint: torch.Tensor, rank: int):
        route = hooks[0].entry.route
        self.hooks, self.joint, self.device = hooks, joint, joint.device
        self.adapters, self.top_k = len(route["adapters"]), route["top_k"]
        self.temperature = float(route["temperature"])
        self.width = self.adapters * (2 + rank)
        # Row j: ones on the codes of adapter j mod A, the one whose |score| is the j-th of [s | -s].
        count = self.adapters
        owner = torch.cat([torch.full((2 * count,), -1), torch.arange(count).repeat_interleave(rank)])
        rows = torch.arange(2 * count) % count
        self.table = (owner == rows.unsqueeze(1)).to(device=joint.device, dtype=joint.dtype)  # [2A, W]
        for number, hook in enumerate(hooks):
            hook.group, hook.number = self, number
        self.sharing = len(hooks) > 1
        self.x = self.mix = self.version = None
        self.pending = 0

    def mixed(self, x: torch.Tensor, hook: RouteHook) -> torch.Tensor:
        """The hook's coefficient-weighted codes [..., W] for input x."""
        if not self.sharing:
            return self._mix(x, hook.own, 1)
        version = None if x.is_inference() else x._version
        if x is self.x and version == self.version:
            self.pending -= 1
            mix = self.mix
            if self.pending <= 0:
                self.x = self.mix = None  # drop the references: activations are not kept
            return mix[hook.number]
        if self.pending > 0:  # a member expected the group's input and got another one
            self.sharing, self.x, self.mix = False, None, None
            return self._mix(x, hook.own, 1)
        mix = self._mix(x, self.joint, len(self.hooks))
        self.mix, self.x, self.version, self.pending = mix, x, version, len(self.hooks) - 1
        return mix[hook.number]

    def _mix(self, x: torch.Tensor, joint: torch.Tensor, modules: int) -> torch.Tensor | tuple:
        """Each code times its adapter's Arrow coefficient (the scores' columns meet zero rows of up).

        [..., W] (x's leading axes) for one module, else a tuple of one per module.
        """
        x = x if x.dtype == joint.dtype else x.to(joint.dtype)
        both = x @ joint
        if modules > 1:
            both = both.view(*both.shape[:-1], modules, self.width)
        if self.top_k == 1:  # the largest of [s | -s] is the largest |s|
            weights = torch.embedding(self.table, both[..., : 2 * self.adapters].argmax(-1))
        else:
            coefficients = arrow_coefficients_of(both[..., : self.adapters], self.top_k, self.temperature)
            weights = coefficients @ self.table[: self.adapters]
        both = both * weights if both.requires_grad else both.mul_(weights)
        return both.unbind(-2) if modules > 1 else both

    def move(self, device: torch.device) -> None:
        """Follow the modules to another device."""
        self.joint, self.device = self.joint.to(device), device
        self.table = self.table.to(device)
        for hook in self.hooks:
            hook.up, hook.own = hook.up.to(device), hook.own.to(device)
            hook.up3 = hook.up.unsqueeze(0)
        self.x = self.mix = None
        self.pending = 0


def _joint(route: dict, bundle, device: torch.device, dtype: torch.dtype, rank: int) -> torch.Tensor:
    """[in, W]: the prototypes, their negatives, then each adapter's down padded to rank R."""
    prototypes = bundle.prepared(route["prototypes"], device, dtype).T
    parts = [prototypes, -prototypes]
    parts += [_padded(bundle.prepared(expert["down"], device, dtype), rank, 1) for expert in route["experts"]]
    return torch.cat(parts, dim=1).contiguous()


def _up(route: dict, bundle, device: torch.device, dtype: torch.dtype, rank: int) -> torch.Tensor:
    """[W, out]: zero rows for the scores, then each adapter's up (scale folded in) padded to rank R."""
    ups = [_padded(bundle.prepared(expert["up"], device, dtype), rank, 0) for expert in route["experts"]]
    return torch.cat([ups[0].new_zeros(2 * len(ups), ups[0].shape[1]), *ups], dim=0).contiguous()


def _side_by_side(hooks: list[RouteHook]) -> torch.Tensor:
    """The members' joints side by side."""
    return torch.cat([hook.own for hook in hooks], dim=1).contiguous()


def group_routes(handle, entries: list, bundle, device_dtype) -> list[tuple[RouteHook, torch.nn.Module]]:
    """A RouteHook per routed (entry, module); modules of one layer that read one input share a group.

    `device_dtype(module)` gives the device and compute dtype of a module's deltas. A group's
    members have the same adapters, device and dtype; R is the largest rank among them.
    """
    groups: dict[tuple, list] = defaultdict(list)
    for entry, module in entries:
        device, dtype = device_dtype(module)
        layer, _, role = entry.sites[0].rpartition(" ") if len(entry.sites) == 1 else ("", "", "")
        adapters = tuple(entry.route["adapters"])
        shared = (layer, _INPUTS[role]) if role in _INPUTS and layer else (entry.name,)
        key = (*shared, adapters, entry.route["top_k"], entry.route["temperature"], str(device), dtype)
        groups[key].append((entry, module, device, dtype))
    hooks = []
    for members in groups.values():
        rank = max(expert["rank"] for entry, *_ in members for expert in entry.route["experts"])
        made = [RouteHook(handle, entry, bundle, device, dtype, rank) for entry, _, device, dtype in members]
        _, _, device, dtype = members[0]
        key = ("route group", tuple(entry.name for entry, *_ in members), str(device), dtype, rank)
        joint = made[0].own if len(made) == 1 else bundle.derived(key, lambda made=made: _side_by_side(made))
        RouteGroup(made, joint, rank)
        hooks += [(hook, module) for hook, (_, module, *_) in zip(made, members, strict=True)]
    return hooks
