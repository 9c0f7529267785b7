"""The registry of adapter formats: which frontend reads a path, and how it lowers onto a base.

An AdapterHub adapter is a directory with adapter_config.json and pytorch_adapter.bin (or
adapter.safetensors); a PEFT adapter is a directory with adapter_config.json; an AIR adapter is
a file, or a directory holding adapter.air.safetensors. Anything else goes to the PEFT reader,
whose errors say what a PEFT directory needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adaptrix.frontends.adapterhub.adapter import (
    HubAdapter,
    is_adapterhub,
    lower_adapterhub,
    read_adapterhub,
)
from adaptrix.frontends.air.adapter import AirAdapter, is_air, read_air
from adaptrix.frontends.air.lower import lower_air
from adaptrix.frontends.peft.adapter import lower_peft
from adaptrix.frontends.peft.config import CONFIG_NAME
from adaptrix.frontends.peft.weights import PeftAdapter, read_peft
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.registry import registry
from adaptrix.ir.values import AdapterIR

__all__ = [
    "FORMATS",
    "AdapterFormat",
    "ReadAdapter",
    "adapter_format",
    "format_name",
    "lower_adapter",
    "read_adapter",
    "source_ir",
]

ReadAdapter = PeftAdapter | AirAdapter | HubAdapter


@dataclass(frozen=True, slots=True)
class AdapterFormat:
    """A file format: whether a path is one, how to read it, how to lower what was read."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], ReadAdapter]
    lower: Callable[..., AdapterIR]
    kind: type


def _register(*formats: AdapterFormat) -> Mapping[str, AdapterFormat]:
    return registry("adapter format", ((entry.name, entry) for entry in formats))


FORMATS = _register(
    AdapterFormat("adapterhub", is_adapterhub, read_adapterhub, lower_adapterhub, HubAdapter),
    AdapterFormat("peft-lora", lambda p: (p / CONFIG_NAME).is_file(), read_peft, lower_peft, PeftAdapter),
    AdapterFormat("air", is_air, read_air, lower_air, AirAdapter),
)


def adapter_format(path: Path | str) -> AdapterFormat:
    """The format a path is in (AdapterHub first: its weights file tells it from PEFT's directory)."""
    path = Path(path)
    return next((f for f in FORMATS.values() if f.detect(path)), FORMATS["peft-lora"])


def read_adapter(path: Path | str) -> ReadAdapter:
    """Read an adapter in whichever format it is (tensors stay lazy)."""
    return adapter_format(path).read(Path(path))


def lower_adapter(adapter: ReadAdapter, base: Checkpoint) -> AdapterIR:
    """Lower a read adapter onto a base."""
    found = next(f for f in FORMATS.values() if isinstance(adapter, f.kind))
    return found.lower(adapter, base)


def source_ir(adapter: ReadAdapter, base: Checkpoint) -> AdapterIR:
    """The adapter's IR before it is fitted to `base`; PEFT is lowered onto it.

    AIR stays in the dimensions it was made for: passes may carry it to the base's, and
    `air_lower.fit_ir` checks the result.
    """
    return adapter.ir() if isinstance(adapter, AirAdapter) else lower_adapter(adapter, base)


def format_name(adapter: ReadAdapter) -> str:
    """The registered name of a read adapter's format."""
    return next(f.name for f in FORMATS.values() if isinstance(adapter, f.kind))
