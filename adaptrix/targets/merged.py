"""The `merged` target: a Hugging Face model directory with the adapter merged into the weights.

Streams the base one tensor at a time: each touched tensor is merged in float32 and rounded
once to the output dtype; untouched tensors are copied byte for byte. Never holds the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from adaptrix.targets.merge_bottleneck import fold_bottlenecks
from adaptrix.targets.merge_math import merge_tensor, op_params, required_params
from adaptrix.targets.written import Written
from adaptrix.toolchain.binders.table import Placement
from adaptrix.toolchain.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from adaptrix.toolchain.errors import BadInputError
from adaptrix.toolchain.ir import AdapterIR, Op, Role, Site
from adaptrix.toolchain.safetensors_io import PlannedTensor, write_safetensors

__all__ = ["TensorPlan", "copy_side_files", "merged_value", "plan_tensors", "write_merged"]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_WEIGHT_FILES = {INDEX_NAME, "pytorch_model.bin.index.json", "manifest.json"}


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: where its value comes from and which ops change it."""

    name: str
    source: str  # the base tensor it starts from
    shard: int
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
    items, untied = plan_tensors(ir, base)
    shards = _shard_names(1 + max(item.shard for item in items))
    written: list[str] = []
    digests: dict[str, str] = {}
    for index, shard_name in enumerate(shards):
        batch = [item for item in items if item.shard == index]
        digests[shard_name] = _write_shard(out / shard_name, batch, base, dtype, progress)
        written.append(shard_name)
    if len(shards) > 1:
        _write_index(out, items, shards, base, dtype)
        written.append(INDEX_NAME)
    written += copy_side_files(base, out, dtype, untied)
    return Written(written, {"untied_lm_head": untied}, digests)


def plan_tensors(ir: AdapterIR, base: Checkpoint) -> tuple[list[TensorPlan], bool]:
    """Every output tensor with the ops that change it, and whether the head is untied."""
    by_site = ir.by_site()
    shard_of = {shard: i for i, shard in enumerate(base.shards)}
    items, used = [], set()
    tied = base.source.tie_word_embeddings
    head_sites = {Site(None, Role.EMBED), Site(None, Role.LM_HEAD)}
    untie = tied and _has_lm_head(base) and bool(head_sites & by_site.keys())
    embed_name = None
    for name, info in base.tensors.items():
        module_name, _, param = name.rpartition(".")
        placement = base.binder.resolve(module_name)
        if placement is None:
            items.append(TensorPlan(name, name, shard_of[info.file], None, param, ()))
            continue
        if placement.module.roles == (Role.EMBED,) and param == "weight":
            embed_name = name
        if untie and placement.module.roles == (Role.LM_HEAD,):
            continue  # a tied head is rebuilt from the embedding below
        role_ops = _role_ops(placement, param, by_site, used)
        items.append(TensorPlan(name, name, shard_of[info.file], placement, param, role_ops))
    if untie:
        head = base.binder.resolve(base.binder.lm_head_weight.rpartition(".")[0])
        role_ops = _role_ops(head, "weight", by_site, used)
        items.append(
            TensorPlan(
                base.binder.lm_head_weight,
                embed_name,
                len(base.shards) - 1,
                head,
                "weight",
                role_ops,
            )
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
    for site, op in ir:
        for param in sorted(required_params(op)):
            if (site, id(op), param) not in used:
                raise BadInputError(
                    f"{site}: {type(op).__name__} changes a {param} that the base does not have",
                    path=base.path,
                    fix="use the base the adapter was made for",
                )


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _planned(item: TensorPlan, base: Checkpoint, dtype: torch.dtype | None) -> PlannedTensor:
    """The output tensor an item becomes: its name, output dtype and shape."""
    info = base.tensors[item.source]
    return PlannedTensor(item.name, _out_dtype(info.dtype, dtype), info.shape)


def _write_shard(file: Path, batch: list[TensorPlan], base: Checkpoint, dtype, progress) -> str:
    """Write one shard; return its sha256."""
    planned = [_planned(item, base, dtype) for item in batch]
    with write_safetensors(file, planned, {"format": "pt"}) as writer:
        run = []  # tensors kept in their dtype: read ahead, merged in place in the bytes read
        for item, plan in zip(batch, planned, strict=True):
            info = base.tensors[item.source]
            if plan.dtype == info.dtype:
                change = partial(_merge_into, item, base) if item.touched else None
                run.append((item.name, info, change))
                continue
            writer.write_each(run, progress)
            run = []
            writer.write(item.name, merged_value(item, base, plan.dtype))
            if progress:
                progress(info.nbytes)
        writer.write_each(run, progress)
    return writer.digest


def merged_value(item: TensorPlan, base: Checkpoint, dtype: torch.dtype) -> torch.Tensor:
    """An output tensor's value in `dtype`, in the checkpoint's layout."""
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


def _write_index(out: Path, items: list[TensorPlan], shards: list[str], base: Checkpoint, dtype) -> None:
    total = sum(_planned(item, base, dtype).nbytes for item in items)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {item.name: shards[item.shard] for item in items},
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: Checkpoint, out: Path, dtype, untied: bool) -> list[str]:
    """Config (updated), generation config, tokenizer files: every non-weight file of the base."""
    copied = []
    for file in base.files():
        if file.name in _WEIGHT_FILES or file.name.endswith(_WEIGHT_SUFFIXES) or file.name.startswith("."):
            continue
        if file.name == "config.json":
            _write_config(base, out / file.name, dtype or base.dtype(), untied)
        else:
            shutil.copy2(file, out / file.name)
        copied.append(file.name)
    return copied


def _write_config(base: Checkpoint, file: Path, dtype: torch.dtype, untied: bool) -> None:
    config = dict(base.config)
    key = "dtype" if "dtype" in config else "torch_dtype"
    config[key] = str(dtype).removeprefix("torch.")
    if untied:
        config["tie_word_embeddings"] = False
        logger.info("untied lm_head from the embedding: the adapter changes one and not the other")
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
