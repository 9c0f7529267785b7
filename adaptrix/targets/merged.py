"""The `merged` target: a Hugging Face model directory with the adapter merged into the weights.

Streams the base one tensor at a time: each touched tensor is merged in float32 and rounded
once to the output dtype; untouched tensors are copied byte for byte. Never holds the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint
from adaptrix.io.safetensors_io import PlannedTensor, write_safetensors
from adaptrix.io.side_files import CONFIG_NAME, plan_side_files, write_config
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.head import head_layout, new_head_sites
from adaptrix.lowering.merge_bottleneck import fold_bottlenecks
from adaptrix.lowering.tensor_plan import TensorPlan, merge_into, merged_value, new_value, plan_tensors
from adaptrix.targets.written import Written

__all__ = ["write_merged", "write_requantized"]

logger = logging.getLogger(__name__)


def write_merged(
    ir: AdapterIR,
    base: Checkpoint,
    out: Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    requantize: bool = False,
) -> Written:
    """Write the merged model into directory `out`; return the files written.

    `requantize`: a bitsandbytes base's touched weights quantized again with its own scheme.
    """
    if requantize:
        return write_requantized(ir, base, out, progress)
    ir = fold_bottlenecks(ir, base)  # linear bottlenecks become weight deltas; others are refused
    side = plan_side_files(base)  # before the weights: a refused side file fails at once
    heads = new_head_sites(ir, base)
    layout = head_layout(ir, base, heads) if heads else None
    items, untied = plan_tensors(ir, base, layout)
    written: list[str] = []
    digests: dict[str, str] = {}
    for shard_name in dict.fromkeys(item.shard for item in items):
        batch = [item for item in items if item.shard == shard_name]
        digests[shard_name] = _write_shard(out / shard_name, batch, base, dtype, progress)
        written.append(shard_name)
    if (base.path / INDEX_NAME).is_file():
        _write_index(out, items, base, dtype)
        written.append(INDEX_NAME)
    written += side.copy(out)
    write_config(base, out / CONFIG_NAME, dtype or base.dtype(), untied, layout.config if layout else {})
    written.append(CONFIG_NAME)
    manifest = {"untied_lm_head": untied, "not_carried": side.skipped}
    if layout is not None:
        manifest["head"] = layout.manifest()
    return Written(written, manifest, digests)


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _planned(item: TensorPlan, base: Checkpoint, dtype: torch.dtype | None) -> PlannedTensor:
    """The output tensor an item becomes: its name, output dtype and shape."""
    if item.source is None:  # a head from the adapter: in the output's dtype
        return PlannedTensor(item.name, dtype or base.dtype(), new_value(item).shape)
    info = base.tensors[item.source]
    return PlannedTensor(item.name, _out_dtype(info.dtype, dtype), info.shape)


def _write_shard(file: Path, batch: list[TensorPlan], base: Checkpoint, dtype, progress) -> str:
    """Write one shard; return its sha256."""
    planned = [_planned(item, base, dtype) for item in batch]
    with write_safetensors(file, planned, {"format": "pt"}) as writer:
        run = []  # tensors kept in their dtype: read ahead, merged in place in the bytes read
        for item, plan in zip(batch, planned, strict=True):
            info = base.tensors.get(item.source)
            if info is not None and plan.dtype == info.dtype and not base.computed(item.source):
                change = partial(merge_into, item, base) if item.touched else None
                run.append((item.name, info, change))
                continue
            writer.write_each(run, progress)
            run = []
            writer.write(item.name, merged_value(item, base, plan.dtype))
            if progress and info is not None:
                progress(info.nbytes)
        writer.write_each(run, progress)
    return writer.digest


def _write_index(out: Path, items: list[TensorPlan], base: Checkpoint, dtype) -> None:
    total = sum(_planned(item, base, dtype).nbytes for item in items)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {item.name: item.shard for item in items},
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_requantized(
    ir: AdapterIR, base: Checkpoint, out: Path, progress: Callable[[int], None] | None = None
) -> Written:
    """The merged model quantized again with the base's own scheme (`--requantize`).

    Untouched tensors (codes and statistics) are copied byte for byte; each touched quantized
    weight is merged into its dequantized value and quantized again by bitsandbytes. The added
    error of that second rounding (max |requantized - merged|) is reported per module.
    """
    ir = fold_bottlenecks(ir, base)
    side = plan_side_files(base)
    items, untied = plan_tensors(ir, base, None)
    if untied or new_head_sites(ir, base):
        raise UnsupportedError("--requantize keeps the base's tensors: the adapter changes a tied head or "
                               "adds one", path=base.path, fix="leave out --requantize")  # fmt: skip
    by_source = {item.source: item for item in items}
    fresh: dict[str, list[str]] = {}  # each touched quantized weight: its output tensors' names
    errors: dict[str, float] = {}
    planned: dict[str, PlannedTensor] = {}
    for item in items:  # quantized once to learn the shapes (the statistics' sizes vary), again below
        if item.touched and base.computed(item.source):
            tensors, errors[item.source.removesuffix(".weight")] = _requantized(item, base)
            fresh[item.source] = list(tensors)
            planned.update({key: PlannedTensor(key, v.dtype, tuple(v.shape)) for key, v in tensors.items()})
    written, digests, weight_map = [], {}, {}
    for shard in base.shards:
        order = [key for name, info in base.stored.items() if info.file == shard
                 for key in _keys(name, fresh, base)]  # fmt: skip
        shard_name = shard.relative_to(base.path).as_posix()
        plans = [planned.get(key) or PlannedTensor(key, base.stored[key].dtype, base.stored[key].shape)
                 for key in order]  # fmt: skip
        with write_safetensors(out / shard_name, plans, {"format": "pt"}) as writer:
            _write_requantized_shard(writer, order, by_source, fresh, base, progress)
        digests[shard_name] = writer.digest
        written.append(shard_name)
        weight_map.update({plan.name: (shard_name, plan.nbytes) for plan in plans})
    if (base.path / INDEX_NAME).is_file():
        total = sum(nbytes for _, nbytes in weight_map.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in weight_map.items()}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(INDEX_NAME)
    written += side.copy(out)
    write_config(base, out / CONFIG_NAME, base.dtype(), False, keep_quantization=True)
    written.append(CONFIG_NAME)
    manifest = {"untied_lm_head": False, "not_carried": side.skipped, "requantize_max_abs_error": errors}
    return Written(written, manifest, digests)


def _keys(name: str, fresh: dict[str, list[str]], base: Checkpoint) -> list[str]:
    """The output tensors a stored tensor stands for: a requantized weight's, in its place; else itself."""
    owner = base.quantization.owner(name)
    if owner not in fresh:
        return [name]
    if name != owner:  # a statistic: written with its weight (new), or copied as stored
        return [] if name in fresh[owner] else [name]
    return fresh[owner]


def _write_requantized_shard(writer, order, by_source, fresh, base: Checkpoint, progress) -> None:
    """Write one shard's tensors in `order`: copies, in-place merges, requantized weights."""
    run, current = [], {}
    for key in order:
        if key in fresh:  # a requantized weight, then its statistics
            writer.write_each(run, progress)
            run = []
            current, _ = _requantized(by_source[key], base)
        if key in current:
            writer.write(key, current[key])
            continue
        item = by_source.get(key)
        change = partial(merge_into, item, base) if item is not None and item.touched else None
        run.append((key, base.stored[key], change))
    writer.write_each(run, progress)


def _requantized(item: TensorPlan, base: Checkpoint) -> tuple[dict[str, torch.Tensor], float]:
    """A touched quantized weight merged and quantized again; the added error (max abs)."""
    info = base.tensors[item.source]
    merged = merged_value(item, base, info.dtype)
    tensors = base.quantization.requantize(item.source, merged, base.stored[item.source])
    error = (base.quantization.dequantize(item.source, tensors, info).float() - merged.float()).abs().max()
    return tensors, float(error)
