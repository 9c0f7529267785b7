"""The hooks target's part for `Bottleneck` ops: one bundle entry per (layer, block).

Each entry names, in the base's checkpoint names, the modules the runtime hooks (see
`adaptrix.runtimes.hooks.bottleneck`), the options exactly as AdapterHub applies them, and its tensors
in canonical layout (down [size, in], up [out, size]). A tensor several ops share (weights shared
across layers) is stored once and named by every entry that uses it.
"""

from __future__ import annotations

import math

import torch

from adaptrix.artifacts import probe_indices
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, Bottleneck, Site

__all__ = ["bottleneck_entries", "layer_prefix"]


def bottleneck_entries(ir: AdapterIR, base: Checkpoint, dtype: torch.dtype) -> tuple[list[dict], dict]:
    """The bundle entries of the IR's Bottleneck ops and their tensors (shared ones once)."""
    entries, tensors, stored = [], {}, {}
    for site, op in ir:
        if not isinstance(op, Bottleneck):
            continue
        prefix, projection = layer_prefix(base, site, op)
        points = base.binder.bottleneck_points[str(op.block)]
        keys = {}
        for name, tensor in op.tensors().items():
            if id(tensor) not in stored:
                key = f"{prefix}{points.block}.bottleneck.{name}"
                tensors[key] = tensor.load().to(dtype).contiguous()
                stored[id(tensor)] = key
            keys[name] = stored[id(tensor)]
        entries.append(
            {
                "name": f"{prefix}{points.block}",
                "sites": [str(site)],
                "block": str(op.block),
                "modules": {
                    "block": prefix + points.block,
                    "output": prefix + points.output,
                    "residual": prefix + points.residual,
                    "residual_arg": points.residual_arg,
                    "norm": prefix + points.norm if points.norm else None,
                    "projection": projection,
                },
                "probe": _probe(base, f"{projection}.weight"),
                "act": op.act.lower(),
                "size": op.size,
                "parallel": op.parallel,
                "scale": op.scale,
                "original_ln_before": op.original_ln_before,
                "original_ln_after": op.original_ln_after,
                "residual_before_ln": op.residual_before_ln,
                "adapter_residual_before_ln": op.adapter_residual_before_ln,
                "ln_eps": {
                    name: norm.eps
                    for name, norm in (("before", op.ln_before), ("after", op.ln_after))
                    if norm is not None
                },
                "tensors": keys,
                "shared": op.shared,
            }
        )
    return entries, tensors


def layer_prefix(base: Checkpoint, site: Site, op: Bottleneck) -> tuple[str, str]:
    """The checkpoint prefix of the site's layer (`model.layers.3.`) and its projection module."""
    points = base.binder.bottleneck_points.get(str(op.block))
    if points is None:
        raise UnsupportedError(
            f"{site}: bottleneck adapters on {base.source.arch} are not supported",
            fix="use a llama or bert base",
        )
    for name in base.tensors:
        module = name.rpartition(".")[0]
        placement = base.binder.resolve(module)
        if placement is not None and placement.layer == site.layer and placement.key == points.projection:
            return module[: len(module) - len(points.projection)], module
    raise BadInputError(
        f"{site}: the base has no {points.projection} in layer {site.layer}",
        path=base.path,
        fix="use the base the adapter was made for",
    )


def _probe(base: Checkpoint, tensor: str) -> dict:
    info = base.tensors[tensor]
    indices = probe_indices(math.prod(info.shape))
    values = base.elements(tensor, indices)
    return {
        "tensor": tensor,
        "shape": list(info.shape),
        "dtype": str(info.dtype).removeprefix("torch."),
        "indices": indices,
        "values": values.tolist(),
    }
