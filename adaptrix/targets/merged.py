"""The `merged` target: a Hugging Face model directory with the adapter merged into the weights.

Streams the base one tensor at a time: each touched tensor is merged in float32 and rounded
once to the output dtype; untouched tensors are copied byte for byte. Never holds the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from adaptrix.binders.table import Placement
from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint
from adaptrix.io.safetensors_io import PlannedTensor, write_safetensors
from adaptrix.io.side_files import CONFIG_NAME, plan_side_files
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import AdapterIR, LazyTensor, Op, Replace, Role, Site
from adaptrix.lowering.head import HeadLayout, head_layout, new_head_sites, refuse_new_head
from adaptrix.lowering.merge_bottleneck import fold_bottlenecks
from adaptrix.lowering.merge_math import merge_tensor, op_params, required_params
from adaptrix.targets.written import Written

__all__ = ["TensorPlan", "copy_side_files", "merged_value", "plan_tensors", "write_merged"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: where its value comes from and which ops change it."""

    name: str
    source: str | None  # the base tensor it starts from; None: a head the adapter brings
    shard: str  # the output file: the base's shard of `source`, by the same name
    placement: Placement | None
    param: str
    role_ops: tuple[tuple[Op, ...], ...]

    @property
    def touched(self) -> bool:
        """Whether any op changes this tensor."""
        return any(self.role_ops)


def write_merged(
    ir: AdapterIR,
    base: Checkpoint,
    out: Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Written:
    """Write the merged model into directory `out`; return the files written."""
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
    _write_config(base, out / CONFIG_NAME, dtype or base.dtype(), untied, layout.config if layout else {})
    written.append(CONFIG_NAME)
    manifest = {"untied_lm_head": untied, "not_carried": side.skipped}
    if layout is not None:
        manifest["head"] = layout.manifest()
    return Written(written, manifest, digests)


def plan_tensors(
    ir: AdapterIR, base: Checkpoint, layout: HeadLayout | None = None
) -> tuple[list[TensorPlan], bool]:
    """Every output tensor with the ops that change it, and whether the head is untied.

    Each lies in the shard of the base that holds its source, under the same file name. With a
    `layout` (a classifier head from the adapter on a headless base) the tensors take the task
    model's names, those it has not are left out, and the head is added to the last shard.
    """
    by_site = ir.by_site()
    shard_names = {shard: _shard_name(shard, base) for shard in base.shards}
    items, used = [], set()
    tied = base.source.tie_word_embeddings
    head_sites = {Site(None, Role.EMBED), Site(None, Role.LM_HEAD)}
    untie = layout is None and tied and _has_lm_head(base) and bool(head_sites & by_site.keys())
    embed = None
    for name, info in base.tensors.items():
        out_name = name if layout is None else layout.names.get(name)
        if out_name is None:
            continue  # a tensor the task model has not (a language-model head)
        module_name, _, param = name.rpartition(".")
        placement = base.binder.resolve(module_name)
        shard = shard_names[info.file]
        if placement is None:
            items.append(TensorPlan(out_name, name, shard, None, param, ()))
            continue
        if placement.module.roles == (Role.EMBED,) and param == "weight":
            embed = (name, shard)
        if untie and placement.module.roles == (Role.LM_HEAD,):
            continue  # a tied head is rebuilt from the embedding below
        role_ops = _role_ops(placement, param, by_site, used)
        items.append(TensorPlan(out_name, name, shard, placement, param, role_ops))
    if untie:
        if embed is None:
            raise BadInputError("has a tied lm_head but no embedding weight", path=base.path,
                                fix="re-save the base with save_pretrained")  # fmt: skip
        head = base.binder.resolve(base.binder.lm_head_weight.rpartition(".")[0])
        role_ops = _role_ops(head, "weight", by_site, used)
        items.append(TensorPlan(base.binder.lm_head_weight, embed[0], embed[1], head, "weight", role_ops))
    if layout is not None:
        last = max(shard_names.values())
        for name, placement in layout.head.items():
            param = name.rpartition(".")[2]
            items.append(
                TensorPlan(name, None, last, placement, param, _role_ops(placement, param, by_site, used))
            )
    _check_all_used(ir, used, base)
    return items, untie


def _has_lm_head(base: Checkpoint) -> bool:
    """Whether the base model has an output head (tied to its embedding when the config says so)."""
    head = base.binder.lm_head_weight
    if head in base.tensors:
        return True
    has_head_module = any(m.roles == (Role.LM_HEAD,) for m in base.binder.model_modules.values())
    architectures = base.config.get("architectures") or []
    return has_head_module and any("LMHead" in a or "CausalLM" in a for a in architectures)


def _role_ops(placement: Placement, param: str, by_site: dict, used: set) -> tuple[tuple[Op, ...], ...]:
    role_ops = []
    for role in placement.module.roles:
        site = Site(placement.layer, role)
        ops = tuple(op for op in by_site.get(site, ()) if param in op_params(op))
        used.update((site, id(op), param) for op in ops)
        role_ops.append(ops)
    return tuple(role_ops)


def _check_all_used(ir: AdapterIR, used: set, base: Checkpoint) -> None:
    unused = [site for site, op in ir for param in required_params(op) if (site, id(op), param) not in used]
    if unused:
        refuse_new_head(ir, base, unused)  # a head the base has not: only write_merged adds it
    for site, op in ir:
        for param in sorted(required_params(op)):
            if (site, id(op), param) not in used:
                raise BadInputError(
                    f"{site}: {type(op).__name__} changes a {param} that the base does not have",
                    path=base.path,
                    fix="use the base the adapter was made for",
                )


def _shard_name(shard: Path, base: Checkpoint) -> str:
    """The output file of a base shard: the same name (a shard must lie in the base's folder)."""
    name = shard.relative_to(base.path).as_posix()
    if "/" in name or name.startswith("."):
        raise BadInputError(
            f"names shard {name!r}, which is not a file of the base's folder",
            path=base.path / INDEX_NAME,
            fix="restore the index the model was saved with",
        )
    return name


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _planned(item: TensorPlan, base: Checkpoint, dtype: torch.dtype | None) -> PlannedTensor:
    """The output tensor an item becomes: its name, output dtype and shape."""
    if item.source is None:  # a head from the adapter: in the output's dtype
        return PlannedTensor(item.name, dtype or base.dtype(), _new_value(item).shape)
    info = base.tensors[item.source]
    return PlannedTensor(item.name, _out_dtype(info.dtype, dtype), info.shape)


def _new_value(item: TensorPlan) -> LazyTensor:
    """The adapter's value of a tensor the base has not."""
    return next(op.tensors[item.param] for ops in item.role_ops for op in ops
                if isinstance(op, Replace) and item.param in op.tensors)  # fmt: skip


def _write_shard(file: Path, batch: list[TensorPlan], base: Checkpoint, dtype, progress) -> str:
    """Write one shard; return its sha256."""
    planned = [_planned(item, base, dtype) for item in batch]
    with write_safetensors(file, planned, {"format": "pt"}) as writer:
        run = []  # tensors kept in their dtype: read ahead, merged in place in the bytes read
        for item, plan in zip(batch, planned, strict=True):
            info = base.tensors.get(item.source)
            if info is not None and plan.dtype == info.dtype:
                change = partial(_merge_into, item, base) if item.touched else None
                run.append((item.name, info, change))
                continue
            writer.write_each(run, progress)
            run = []
            writer.write(item.name, merged_value(item, base, plan.dtype))
            if progress and info is not None:
                progress(info.nbytes)
        writer.write_each(run, progress)
    return writer.digest


def merged_value(item: TensorPlan, base: Checkpoint, dtype: torch.dtype) -> torch.Tensor:
    """An output tensor's value in `dtype`, in the checkpoint's layout."""
    if item.source is None:
        return _new_value(item).load().to(dtype)
    value = base.read(item.source)
    if not item.touched:
        return value.to(dtype)
    return merge_tensor(
        value, item.param, item.placement, item.role_ops, base.source, dtype, name=item.source
    )


def _merge_into(item: TensorPlan, base: Checkpoint, value: torch.Tensor) -> None:
    """Merge an item into its base value, in place (the output dtype is the stored one)."""
    merge_tensor(value, item.param, item.placement, item.role_ops, base.source, value.dtype, out=value,
                 name=item.source)  # fmt: skip


def _write_index(out: Path, items: list[TensorPlan], base: Checkpoint, dtype) -> None:
    total = sum(_planned(item, base, dtype).nbytes for item in items)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {item.name: item.shard for item in items},
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: Checkpoint, out: Path, dtype, untied: bool) -> list[str]:
    """Config (updated), tokenizer files, folders: everything of the base but its weights."""
    copied = plan_side_files(base).copy(out)
    _write_config(base, out / CONFIG_NAME, dtype or base.dtype(), untied)
    return [*copied, CONFIG_NAME]


def _write_config(base: Checkpoint, file: Path, dtype: torch.dtype, untied: bool, updates=None) -> None:
    config = {**base.config, **(updates or {})}
    key = "dtype" if "dtype" in config else "torch_dtype"
    config[key] = str(dtype).removeprefix("torch.")
    if untied:
        config["tie_word_embeddings"] = False
        logger.info("untied lm_head from the embedding: the adapter changes one and not the other")
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
