"""Module inputs over a calibration: which modules read one input, and a capture that collects them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from adaptrix.binders.table import Placement
from adaptrix.calibration.prompts import batches
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import Role

__all__ = ["STAGES", "Capture", "input_group"]

# Where in a layer each role's module reads its input: modules of one stage read one input.
STAGES = {Role.ATTN_Q: 0, Role.ATTN_K: 0, Role.ATTN_V: 0, Role.ATTN_O: 1, Role.MLP_GATE: 2, Role.MLP_UP: 2,
          Role.MLP_DOWN: 3, Role.LM_HEAD: 4, Role.POOLER: 4, Role.CLS_DENSE: 5, Role.CLS_HEAD: 6}  # fmt: skip


def input_group(placement: Placement, layers: int) -> tuple[int, int]:
    """(layer, stage) of a module whose roles are all in STAGES: modules of one group read one input.

    Model-level modules (the head) count as layer `layers`, after the last one; keys sort in
    forward order.
    """
    layer = layers if placement.layer is None else placement.layer
    return layer, min(STAGES[role] for role in placement.module.roles)


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a capture once it has every input it needs: the rest of the forward is skipped."""


class Capture:
    """Collects the inputs of some modules over the calibration, per batch, for a consumer."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    @torch.no_grad()
    def run(self, model: torch.nn.Module, sequences: list[list[int]], consume: Callable[[dict], None]):
        """Run `model` batch by batch; call `consume({name: inputs [tokens, in]})` for each batch."""
        seen: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def read(module: torch.nn.Module, args: tuple) -> None:
                x = args[0]
                seen[name] = x.reshape(-1, x.shape[-1]).to(torch.float64)
                if len(seen) == len(self.modules):
                    raise _Stop

            return read

        removers = [module.register_forward_pre_hook(hook(name)) for name, module in self.modules.items()]
        try:
            for ids in batches(sequences):
                seen.clear()
                with contextlib.suppress(_Stop):
                    model(input_ids=ids)
                if len(seen) != len(self.modules):
                    missing = sorted(set(self.modules) - set(seen))
                    raise BadInputError(f"refit: the model never called {', '.join(missing)}")
                consume(dict(seen))
        finally:
            for remover in removers:
                remover.remove()
