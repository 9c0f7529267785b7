"""The AIR container's names: the format tag, tensor keys, op kinds and their slots (docs/air.md).

Shared by the AIR reader (frontends/air.py) and writer (targets/air.py), so the two cannot drift.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from adaptrix.artifacts import AIR_FORMAT
from adaptrix.ir.values import Role, Site

__all__ = [
    "FILE_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "PARAM_NAME",
    "SLOTS",
    "KeyParts",
    "parse_key",
    "site_key",
    "slot_suffix",
    "tensor_key",
]

FORMAT = AIR_FORMAT
FORMAT_VERSION = 1
FILE_NAME = "adapter.air.safetensors"  # the file's name inside a directory given as an AIR adapter

# Every key __metadata__ may hold, and whether it must be there.
METADATA_KEYS: Mapping[str, bool] = MappingProxyType(
    {"format": True, "format_version": True, "name": False, "source": True, "ops": True, "provenance": True}
)

# Op kind -> the slots of its "tensors" object that must be filled (replace: one per parameter).
SLOTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"lora": ("A", "B"), "dora": ("A", "B", "magnitude"), "bias": ("delta",), "replace": ()}
)
_SUFFIXES = {"A": "lora_A", "B": "lora_B", "magnitude": "dora_magnitude", "delta": "bias_delta"}
_PARAM = r"[A-Za-z_][A-Za-z0-9_]*"
_KEY = re.compile(
    rf"(?:layers\.(?P<layer>0|[1-9][0-9]*)\.)?(?P<role>[a-z_]+)\.(?:op(?P<op>[1-9][0-9]*)\.)?"
    rf"(?P<suffix>lora_A|lora_B|dora_magnitude|bias_delta|replace\.{_PARAM})"
)
PARAM_NAME = re.compile(_PARAM)


@dataclass(frozen=True, slots=True)
class KeyParts:
    """A tensor key taken apart: the site it names, the op index there, and its suffix."""

    site: Site
    op_index: int
    suffix: str


def site_key(site: Site) -> str:
    """`layers.3.attn_q` for a layer site, `embed` for a model-level one."""
    return str(site.role) if site.layer is None else f"layers.{site.layer}.{site.role}"


def slot_suffix(kind: str, slot: str) -> str:
    """The key suffix of an op slot: lora_A, lora_B, dora_magnitude, bias_delta, replace.PARAM."""
    return f"replace.{slot}" if kind == "replace" else _SUFFIXES[slot]


def tensor_key(site: Site, op_index: int, kind: str, slot: str) -> str:
    """The key of one op tensor: the site, `opN.` for the N-th op (N >= 1) there, the slot's suffix."""
    infix = f"op{op_index}." if op_index else ""
    return f"{site_key(site)}.{infix}{slot_suffix(kind, slot)}"


def parse_key(key: str) -> KeyParts | None:
    """Take a tensor key apart; None when it does not follow the grammar or names no known site."""
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    try:
        role = Role(match.group("role"))
        layer = None if match.group("layer") is None else int(match.group("layer"))
        site = Site(layer, role)
    except ValueError:
        return None
    return KeyParts(site, int(match.group("op") or 0), match.group("suffix"))
