"""Every output tensor of a merged model: where its value comes from and which ops change it.

What the merged and ONNX targets share: the plan (names, shards, ops per role, a tied head
untied, a classifier head from the adapter) and each tensor's merged value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adaptrix.binders.table import Placement
from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, LazyTensor, Op, Replace, Role, Site
from adaptrix.lowering.head import HeadLayout, refuse_new_head
from adaptrix.lowering.merge_math import merge_tensor, op_params, required_params

__all__ = ["TensorPlan", "merge_into", "merged_value", "new_value", "plan_tensors"]


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: where its value comes from and which ops change it."""

    name: str
    source: str | None  # the base tensor it starts from; None: a head the adapter brings
    shard: str  # the output file: the base's shard of `source`, by the same name
    placement: Placement | None
    param: str
    role_ops: tuple[tuple[Op, ...], ...]
    # A tensor that packs several modules' weights (MoE experts saved as transformers 5 loads them):
    # (expert or None, (first row, last row), the module's placement, its role ops) for each.
    pieces: tuple[tuple[int | None, tuple[int, int], Placement, tuple[tuple[Op, ...], ...]], ...] = ()

    @property
    def touched(self) -> bool:
        """Whether any op changes this tensor."""
        return any(self.role_ops) or any(any(piece[3]) for piece in self.pieces)


def plan_tensors(
    ir: AdapterIR, base: Checkpoint, layout: HeadLayout | None = None
) -> tuple[list[TensorPlan], bool]:
    """Every output tensor with the ops that change it, and whether the head is untied.

    Each lies in the shard of the base that holds its source, under the same file name. With a
    `layout` (a classifier head from the adapter on a headless base) the tensors take the task
    model's names, those it has not are left out, and the head is added to the last shard.
    """
    by_site = ir.by_site()
    _refuse_tied(base, by_site)
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
            pieces = _packed_pieces(base, module_name, param, by_site, used)
            items.append(TensorPlan(out_name, name, shard, None, param, (), pieces))
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


def _packed_pieces(base: Checkpoint, module: str, param: str, by_site: dict, used: set) -> tuple:
    """The stored expert weights a packed tensor holds (`mlp.experts.gate_up_proj`), with their ops."""
    layer, key = base.binder.layer_of(module) or (None, None)
    if key not in base.binder.packed_params:
        return ()
    pieces = []
    prefix = module[: len(module) - len(key)]
    for name, piece in base.binder.layer_modules.items():
        if piece.packed is not None and (piece.packed.module, piece.packed.param) == (key, param):
            placement = Placement(prefix + name, layer, name, piece)
            role_ops = _role_ops(placement, "weight", by_site, used)
            pieces.append((piece.packed.expert, piece.packed.rows, placement, role_ops))
    return tuple(pieces)


def _refuse_tied(base: Checkpoint, by_site: dict) -> None:
    """A delta on a tied module other than the head (LUKE's entity head): no checkpoint can hold it.

    The class ties the module to its sharer again on load, whatever the config says, so the
    module cannot change without the sharer (PEFT's merge_and_unload changes both; its forward,
    and the hooks target, only the module).
    """
    for key, sharers in base.binder.ties.items():
        module = base.binder.model_modules.get(key)
        stored = any(name == f"{key}.weight" or name.endswith(f".{key}.weight") for name in base.tensors)
        if module is None or stored or module.roles == (Role.LM_HEAD,):
            continue
        if any(Site(None, role) in by_site for role in module.roles):
            raise UnsupportedError(
                f"changes {key}, whose weight is {sharers[0]}'s (tied, stored once, tied again on "
                "load): a merged checkpoint cannot change one without the other",
                path=base.path, fix="use --target hooks: it adapts the module alone, as PEFT's forward does",
            )  # fmt: skip


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
    if (
        Site(None, Role.LM_HEAD) in unused
        and base.source.tie_word_embeddings
        and base.config.get("is_encoder_decoder")
    ):
        raise UnsupportedError(
            "lm_head: the adapter changes the head an encoder-decoder ties to its embeddings, which a "
            "merged model cannot untie yet (T5 rescales a tied head's input; BART ties its stacks' "
            "embeddings with it)",
            path=base.path,
            fix="use --target hooks, or leave lm_head out of the LoRA",
        )
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


def new_value(item: TensorPlan) -> LazyTensor:
    """The adapter's value of a tensor the base has not."""
    return next(op.tensors[item.param] for ops in item.role_ops for op in ops
                if isinstance(op, Replace) and item.param in op.tensors)  # fmt: skip


def merged_value(
    item: TensorPlan, base: Checkpoint, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """An output tensor's value in `dtype`, in the checkpoint's layout (written into `out` when given)."""
    if item.source is None:
        return new_value(item).load().to(dtype)
    value = base.read(item.source)
    if not item.touched:
        return value.to(dtype) if out is None else out.copy_(value)
    if item.pieces:
        merged = _merge_pieces(item, base, value.clone())
        return merged.to(dtype) if out is None else out.copy_(merged)
    return merge_tensor(
        value, item.param, item.placement, item.role_ops, base.source, dtype, out=out, name=item.source
    )


def merge_into(item: TensorPlan, base: Checkpoint, value: torch.Tensor) -> None:
    """Merge an item into its base value, in place (the output dtype is the stored one)."""
    if item.pieces:
        _merge_pieces(item, base, value)
        return
    merge_tensor(value, item.param, item.placement, item.role_ops, base.source, value.dtype, out=value,
                 name=item.source)  # fmt: skip


def _merge_pieces(item: TensorPlan, base: Checkpoint, value: torch.Tensor) -> torch.Tensor:
    """Merge each packed module's ops into its rows of `value`, in place."""
    for expert, (first, last), placement, role_ops in item.pieces:
        rows = (value if expert is None else value[expert])[first:last]
        merge_tensor(rows, "weight", placement, role_ops, base.source, rows.dtype, out=rows, name=item.source)
    return value
