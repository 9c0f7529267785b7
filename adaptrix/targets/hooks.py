"""The `hooks` target: a bundle of unmerged deltas that `adaptrix.attach` hooks onto a model.

Each touched module becomes one entry in its own layout (adaptrix.lowering.module_entries). The
bundle format is described in `adaptrix.runtimes.hooks.bundle`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptrix.artifacts import BOTTLENECK_FORMAT, BUNDLE_FORMAT, KINDS_FORMAT, ROUTE_FORMAT, TENSORS_FILE
from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint
from adaptrix.ir.bottleneck import Bottleneck
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.route import route_summary
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.bottleneck_entries import bottleneck_entries
from adaptrix.lowering.module_entries import EntryBuilder
from adaptrix.lowering.touched import touched_modules
from adaptrix.targets.written import Written

__all__ = ["write_hooks"]

_KIND_KEYS = ("dense", "scale_out", "scale_in")


def write_hooks(
    ir: AdapterIR,
    base: Checkpoint,
    out: Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Written:
    """Write the bundle (deltas + the manifest's bundle section) into directory `out`."""
    dtype = dtype or torch.float32
    bottlenecks, tensors = bottleneck_entries(ir, base, dtype)
    ir = AdapterIR(tuple((s, op) for s, op in ir if not isinstance(op, Bottleneck)), ir.source, ir.name)
    entries = []
    for module in touched_modules(ir, base):
        builder = EntryBuilder(module, base, dtype)
        try:
            entries.append(builder.entry())
        except BadInputError as exc:
            raise exc.with_context(module.placement.name) from None
        tensors.update(builder.tensors)
    # One metadata key: safetensors writes its metadata map in a random order, so two keys would
    # make two compiles of the same inputs differ byte for byte.
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": "pt"})
    if progress:
        progress(sum(info.nbytes for info in base.tensors.values()))
    kinds = any(key in entry for entry in entries for key in _KIND_KEYS)
    version = BOTTLENECK_FORMAT if bottlenecks else KINDS_FORMAT if kinds else BUNDLE_FORMAT
    version = ROUTE_FORMAT if any("route" in entry for entry in entries) else version
    section = {
        "format_version": version,  # older readers refuse what they lack
        "tensors_file": TENSORS_FILE,
        "dtype": str(dtype).removeprefix("torch."),
        "base": _base_section(base),
        "modules": entries,
        **({"bottlenecks": bottlenecks} if bottlenecks else {}),
    }
    routed = route_summary(ir)
    return Written([TENSORS_FILE], {"bundle": section, **({"route": routed} if routed else {})})


def _base_section(base: Checkpoint) -> dict:
    """What the bundle was compiled for: model type, dimensions, config values, file digests."""
    config_values = {}
    for names in base.binder.config_keys.values():
        for name in names:
            if base.config.get(name) is not None:
                config_values[name] = base.config[name]
    index = base.path / INDEX_NAME
    if index.is_file():
        index_digest = hashlib.sha256(index.read_bytes()).hexdigest()
    else:  # a single file: its header is the index
        with base.shards[0].open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            index_digest = hashlib.sha256(handle.read(length)).hexdigest()
    return {
        "model_type": base.source.arch,
        "dimensions": base.source.as_dict(),
        "config": config_values,
        "config_sha256": hashlib.sha256((base.path / "config.json").read_bytes()).hexdigest(),
        "weights_index_sha256": index_digest,
        "weights_index": INDEX_NAME if index.is_file() else f"{base.shards[0].name} header",
    }
