"""The AIR writer: an IR as one safetensors file keyed by layer and role (docs/air.md).

Tensors are written one at a time (never all in memory); a tensor several ops share (the A of a
fused module's roles) is stored once and named by every op that uses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from adaptrix.io.air_format import FORMAT, FORMAT_VERSION, tensor_key
from adaptrix.io.safetensors_io import PlannedTensor, write_safetensors
from adaptrix.ir.bottleneck import refuse_bottlenecks
from adaptrix.ir.errors import UnsupportedError, site_context
from adaptrix.ir.factored_low_rank import factored_as_low_rank, low_rank_record
from adaptrix.ir.values import (
    AdapterIR,
    Bias,
    DoRA,
    LazyTensor,
    LowRank,
    Op,
    Replace,
    Site,
    refuse_module_roles,
    site_order,
)

__all__ = ["air_metadata", "write_air_file"]


def write_air_file(
    ir: AdapterIR, file: Path, provenance: Mapping[str, object], dtype: torch.dtype = torch.float32
) -> list[str]:
    """Write `ir` as an AIR file at `file` (the caller makes it atomic); return the tensor keys.

    LoHa / LoKr ops are written as lora ops, their exact low-rank forms; the provenance's
    `low_rank_forms` lists them (site, kind, rank).
    """
    refuse_bottlenecks(ir, "AIR cannot hold bottleneck adapters yet",
                       fix="compile the AdapterHub adapter directly (--target hooks)")  # fmt: skip
    refuse_module_roles(ir, "AIR is architecture-agnostic and needs semantic roles (attn_q, mlp_down, ...)")
    if forms := low_rank_record(ir):
        ir, provenance = factored_as_low_rank(ir), {**provenance, "low_rank_forms": forms}
    entries, tensors = _layout(ir)
    planned = [PlannedTensor(key, dtype, tensor.shape) for key, tensor in tensors.items()]
    with write_safetensors(file, planned, air_metadata(ir, entries, provenance)) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor.load().to(dtype))
    return list(tensors)


def air_metadata(ir: AdapterIR, entries: list[dict], provenance: Mapping[str, object]) -> dict[str, str]:
    """The file's __metadata__: string values, JSON inside."""
    compact = {"separators": (",", ":"), "sort_keys": True}
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": ir.name,
        "source": json.dumps(ir.source.as_dict(), **compact),
        "ops": json.dumps(entries, **compact),
        "provenance": json.dumps(dict(provenance), **compact),
    }


def _layout(ir: AdapterIR) -> tuple[list[dict], dict[str, LazyTensor]]:
    """One metadata entry per op (by site; at a site in IR order), and every distinct tensor by its key."""
    entries: list[dict] = []
    tensors: dict[str, LazyTensor] = {}
    named: dict[tuple[int, str], str] = {}  # (id of the lazy tensor, its key suffix's slot) -> key
    at_site: dict[Site, int] = {}
    for site, op in sorted(ir.ops, key=lambda pair: site_order(pair[0])):
        index = at_site.get(site, 0)
        at_site[site] = index + 1
        with site_context(site):
            kind, slots, extra = _describe(op)
        keys = {}
        for slot, tensor in slots.items():
            shared = (id(tensor), slot if kind != "replace" else f"replace.{slot}")
            if shared not in named:
                named[shared] = tensor_key(site, index, kind, slot)
                tensors[named[shared]] = tensor
            keys[slot] = named[shared]
        entries.append({"layer": site.layer, "role": str(site.role), "op": kind, **extra, "tensors": keys})
    return entries, tensors


def _describe(op: Op) -> tuple[str, dict[str, LazyTensor], dict[str, object]]:
    """An op's kind, its tensors by slot, and its other fields."""
    if isinstance(op, LowRank):
        return "lora", {"A": op.a, "B": op.b}, {"rank": op.rank, "scale": op.scale}
    if isinstance(op, DoRA):
        low_rank = op.low_rank
        slots = {"A": low_rank.a, "B": low_rank.b, "magnitude": op.magnitude}
        return "dora", slots, {"rank": low_rank.rank, "scale": low_rank.scale, "per_column": op.per_column}
    if isinstance(op, Bias):
        return "bias", {"delta": op.delta}, {}
    if isinstance(op, Replace):
        return "replace", dict(op.tensors), {}
    raise UnsupportedError(
        f"AIR version {FORMAT_VERSION} holds LoRA, DoRA, bias and replace ops, not a "
        f"{getattr(op, 'label', type(op).__name__)} op",
        fix="compile the PEFT adapter directly (--target merged, hooks or onnx-cpu)",
    )
