"""The registry of targets: each turns an IR and a base into files."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from adaptrix.targets.hooks import write_hooks
from adaptrix.targets.merged import write_merged
from adaptrix.targets.written import Written
from adaptrix.toolchain.errors import BadInputError

__all__ = ["TARGETS", "Target", "Written", "target_named"]


@dataclass(frozen=True, slots=True)
class Target:
    """A named output format: `write(ir, base, out, dtype=, progress=)` fills directory `out`."""

    name: str
    summary: str
    write: Callable[..., Written]
    default_dtype: torch.dtype | None = None  # None: the base's


def _register(*targets: Target) -> Mapping[str, Target]:
    table: dict[str, Target] = {}
    for target in targets:
        if target.name in table:
            raise ValueError(f"target {target.name!r} is registered twice")
        table[target.name] = target
    return MappingProxyType(table)


TARGETS = _register(
    Target(
        "merged",
        "Hugging Face model directory with the adapter merged (sharded safetensors)",
        write_merged,
    ),
    Target(
        "hooks",
        "bundle of unmerged deltas for adaptrix.attach on an eager PyTorch model",
        write_hooks,
        default_dtype=torch.float32,
    ),
)


def target_named(name: str) -> Target:
    """The target called `name`, or an error listing the known ones."""
    if name not in TARGETS:
        raise BadInputError(f"unknown target {name!r}", fix=f"choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]
