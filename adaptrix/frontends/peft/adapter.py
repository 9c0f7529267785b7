"""PEFT frontend: an adapter directory and its base -> AdapterIR, exactly what PEFT computes.

LoRA (with DoRA, biases, modules_to_save) is lowered here; LoHa, LoKr, IA3 and VeRA modules in
peft_kinds.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptrix.binders.table import Layout, Placement, split_rows
from adaptrix.frontends.peft.kinds import kind_op, vera_projections
from adaptrix.frontends.peft.parameters import packed_ops, targeted_param
from adaptrix.frontends.peft.weights import PeftAdapter, PeftModule, read_peft
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.safetensors_io import TensorInfo
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import (
    AdapterIR,
    Bias,
    DoRA,
    Factored,
    LazyTensor,
    LowRank,
    Op,
    Replace,
    Role,
    Scale,
    Site,
)
from adaptrix.lowering.sites import base_modules

__all__ = ["base_modules", "load_peft", "lower_peft"]


def load_peft(adapter: Path | str, base: Checkpoint) -> AdapterIR:
    """Read a PEFT adapter directory and lower it onto `base`."""
    return lower_peft(read_peft(adapter), base)


def lower_peft(adapter: PeftAdapter, base: Checkpoint) -> AdapterIR:
    """Lower a read PEFT adapter onto a base: place, check shapes, split fused modules."""
    modules = base_modules(base)
    lowering = _Lowering(adapter, base, modules)
    ops: list[tuple[Site, Op]] = []
    for record in adapter.modules.values():
        ops.extend(lowering.module_ops(record))
    _check_targets(adapter, base, modules)
    return AdapterIR(tuple(ops), base.source, name=adapter.path.name)


class _Lowering:
    """Lowers each module record of one adapter onto one base."""

    def __init__(self, adapter: PeftAdapter, base: Checkpoint, modules: dict):
        self.adapter, self.base, self.modules = adapter, base, modules
        self.file = adapter.weights_file
        self._projections: dict[str, LazyTensor] | None = None

    def projections(self) -> dict[str, LazyTensor]:
        """VeRA's shared projections, sized for every module the adapter holds (made once)."""
        if self._projections is None:
            records = [r for r in self.adapter.modules.values() if r.has_delta]
            shapes = [self._base_shape(self._place(r.name)) for r in records]
            self._projections = vera_projections(self.adapter, shapes)
        return self._projections

    def module_ops(self, record: PeftModule) -> list[tuple[Site, Op]]:
        packed = packed_ops(self.base.binder, self.adapter.settings, record)
        if packed is not None:  # LoRA on a 3-D expert parameter (transformers 5, target_parameters)
            return packed
        placement = self._place(record.name.removesuffix(".base_layer"))
        if self._is_new_head(record, placement):
            return [(Site(placement.layer, placement.module.roles[0]), self._new_head(record, placement))]
        out_rows, in_cols = self._base_shape(placement)
        ops: list[Op] = []
        if record.factors or (record.has_lora and self.adapter.settings.peft_type != "LORA"):
            ops.append(kind_op(self.adapter, record, placement, (out_rows, in_cols), self.projections))
        elif record.has_lora:
            ops.append(self._low_rank(record, placement, out_rows, in_cols))
        params = dict(record.params)
        bias_value = params.pop("bias", None) if not self.adapter.settings.saves(record.name) else None
        if params:
            ops.append(Replace({p: self._canonical(placement, p, t) for p, t in params.items()}))
        if bias_value is not None:
            ops.append(Bias(self._bias_delta(placement, bias_value, out_rows)))
        if record.lora_b_bias is not None:
            scale = self.adapter.settings.scale(record.name)
            ops.append(Bias(self._checked(record.lora_b_bias, (out_rows,)).scaled(scale)))
        return self._split(placement, ops)

    def _place(self, name: str) -> Placement:
        placement = self.base.binder.resolve(name)
        if placement is None:
            raise BadInputError(
                f"has weights for module {name!r}, which has no role in a {self.base.binder.name} "
                "model: the adapter was made for another architecture",
                path=self.file,
                fix=f"use the base it was trained on (known modules: {', '.join(self.base.binder.roles())})",
            )
        layers = self.base.source.num_layers
        if placement.layer is not None and placement.layer >= layers:
            raise BadInputError(
                f"has weights for layer {placement.layer}, but the base has {layers} layers: "
                "the adapter was made for a deeper model",
                path=self.file,
                fix="use the base it was trained on",
            )
        return placement

    def _is_new_head(self, record: PeftModule, placement: Placement) -> bool:
        """A classifier head saved by modules_to_save for a base without one (PEFT adds it)."""
        return (
            self.adapter.settings.saves(record.name)
            and set(placement.module.roles) <= _HEAD_ROLES
            and not record.has_delta
            and self._base_tensor(placement, "weight") is None
        )

    def _new_head(self, record: PeftModule, placement: Placement) -> Replace:
        """The saved head as it is, checked against the base's hidden size (targets check the rest)."""
        task, hidden = self.adapter.settings.task_type, self.base.source.hidden_size
        if task != "SEQ_CLS":
            raise UnsupportedError(
                f"saves {record.name!r}, a head the base does not have, for task_type {task!r}",
                path=self.file,
                fix="only a SEQ_CLS head is added to a headless base; use the base it was trained on",
            )
        weight, bias = record.params.get("weight"), record.params.get("bias")
        if weight is None or set(record.params) - {"weight", "bias"} or len(weight.shape) != 2:
            raise BadInputError(f"saves {record.name!r} without a 2-D weight, or with other tensors",
                                path=self.file, fix="re-save the adapter with PEFT")  # fmt: skip
        self._checked(weight, (weight.shape[0], hidden))
        if bias is not None:
            self._checked(bias, (weight.shape[0],))
        return Replace(record.params)

    def _base_tensor(self, placement: Placement, param: str) -> TensorInfo | None:
        """The base tensor a module's parameter is stored in (a tied module's is its sharer's)."""
        name = self.modules.get((placement.layer, placement.key))
        if name is None and placement.module.roles == (Role.LM_HEAD,) and param == "weight":
            name = self.modules.get((None, _embed_key(self.base)))
        for key in self.base.binder.ties.get(placement.key, ()) if name is None and param == "weight" else ():
            name = name or self.modules.get((None, key))  # a tied module's weight: LUKE's entity head
        return self.base.info(f"{name}.{param}") if name else None

    def _base_shape(self, placement: Placement) -> tuple[int, int]:
        """The module's weight shape in canonical [out, in] order (1-D norms: [dim, 0])."""
        info = self._base_tensor(placement, "weight")
        if info is None:
            raise BadInputError(
                f"targets {placement.name!r}, which the base {self.base.path} does not have",
                path=self.file,
                fix="use the base the adapter was trained on",
            )
        shape = info.shape
        if placement.module.layout is Layout.CONV1D:
            return shape[1], shape[0]
        return (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 0)

    def _low_rank(self, record: PeftModule, placement: Placement, out_rows: int, in_cols: int) -> Op:
        settings, name = self.adapter.settings, record.name
        embedding = placement.module.layout is Layout.EMBEDDING
        first, second = ("embedding_a", "embedding_b") if embedding else ("lora_a", "lora_b")
        a, b = getattr(record, first), getattr(record, second)
        if a is None or b is None:
            have, lack = (first, second) if b is None else (second, first)
            raise BadInputError(
                f"has {_SAVED_NAMES[have]} but no {_SAVED_NAMES[lack]} for {name!r}",
                path=self.file,
                fix="the adapter file is incomplete; re-save it",
            )
        rank = settings.rank(name)
        if embedding:
            # PEFT stores A [r, num] and B [dim, r]; the canonical delta [num, dim] is A.T @ B.T.
            a, b = (
                self._checked(b, (in_cols, rank)).transposed(),
                self._checked(a, (rank, out_rows)).transposed(),
            )
        else:
            a, b = self._checked(a, (rank, in_cols)), self._checked(b, (out_rows, rank))
        low_rank = LowRank(a, b, settings.scale(name))
        if record.magnitude is None:
            if settings.use_dora:
                raise BadInputError(f"has no lora_magnitude_vector for DoRA module {name!r}", path=self.file)
            return low_rank
        if embedding:  # PEFT normalises an embedding per hidden dimension: over the vocabulary
            return DoRA(low_rank, self._checked(record.magnitude, (in_cols,)), per_column=True)
        return DoRA(low_rank, self._checked(record.magnitude, (out_rows,)))

    def _checked(self, tensor: LazyTensor, expected: tuple[int, ...]) -> LazyTensor:
        if tensor.shape == expected:
            return tensor
        raise BadInputError(
            f"tensor {tensor.origin.rpartition(':')[2]!r} has shape {list(tensor.shape)} but the "
            f"base and adapter_config.json (r={self.adapter.settings.r}) need {list(expected)}",
            path=self.file,
            fix="the adapter does not fit this base: use the base it was trained on, or fix r/rank_pattern",
        )

    def _canonical(self, placement: Placement, param: str, value: LazyTensor) -> LazyTensor:
        """A saved module parameter in canonical layout, checked against the base."""
        info = self._base_tensor(placement, param)
        if info is None or info.shape != value.shape:
            found = "no such tensor" if info is None else f"shape {list(info.shape)}"
            raise BadInputError(
                f"replaces {placement.name}.{param} with shape {list(value.shape)} but the base has {found}",
                path=self.file,
                fix="use the base the adapter was trained on",
            )
        if placement.module.layout is Layout.CONV1D and param == "weight":
            return value.transposed()
        return value

    def _bias_delta(self, placement: Placement, trained: LazyTensor, out_rows: int) -> LazyTensor:
        """PEFT saves trained biases as values; the IR holds them as deltas from the base's."""
        info = self._base_tensor(placement, "bias")
        if info is None:
            raise UnsupportedError(
                f"trains a bias for {placement.name!r}, which has no bias in the base",
                path=self.file,
                fix="this architecture has no bias there; retrain with bias='none'",
            )
        self._checked(trained, (out_rows,))
        base, name = self.base, info.name
        return trained.map(lambda t: t - base.read(name).to(torch.float32), trained.shape)

    def _split(self, placement: Placement, ops: list[Op]) -> list[tuple[Site, Op]]:
        roles = placement.module.roles
        index = split_rows(placement.module.split, self.base.source)
        if index is None:
            return [(Site(placement.layer, roles[0]), op) for op in ops]
        return [
            (Site(placement.layer, role), _rows(op, rows))
            for op in ops
            for role, rows in zip(roles, index, strict=True)
        ]


def _rows(op: Op, rows: torch.Tensor) -> Op:
    """The part of an op that acts on some output rows of a fused module."""
    if isinstance(op, LowRank):
        return LowRank(op.a, op.b.rows(rows), op.scale)
    if isinstance(op, DoRA):  # a per-column magnitude belongs to every row: it is not split
        magnitude = op.magnitude if op.per_column else op.magnitude.rows(rows)
        return DoRA(_rows(op.low_rank, rows), magnitude, op.per_column)
    if isinstance(op, Bias):
        return Bias(op.delta.rows(rows))
    if isinstance(op, Factored | Scale):
        return op.select_rows(rows)
    return Replace({p: t.rows(rows) for p, t in op.tensors.items()})


_HEAD_ROLES = frozenset({Role.CLS_HEAD, Role.CLS_DENSE})  # the targets' head.py names the same roles

_SAVED_NAMES = {
    "lora_a": "lora_A",
    "lora_b": "lora_B",
    "embedding_a": "lora_embedding_A",
    "embedding_b": "lora_embedding_B",
}


def _embed_key(base: Checkpoint) -> str:
    return next(k for k, m in base.binder.model_modules.items() if m.roles == (Role.EMBED,))


def _check_targets(adapter: PeftAdapter, base: Checkpoint, modules: dict) -> None:
    """Every module the config targets has adapter weights, and every module with them is targeted."""
    settings, binder = adapter.settings, base.binder
    kind = "LoRA" if settings.peft_type == "LORA" else settings.peft_type
    have = {}
    for record in adapter.modules.values():
        if record.has_delta:
            param = targeted_param(binder, settings, record.name)
            if param is not None and len(param[1]) == 3:
                continue  # a packed expert parameter: its stored weights are checked by their shapes
            placement = binder.resolve(record.name.removesuffix(".base_layer"))
            have[(placement.layer, placement.key)] = record.name
            wrapped = param is not None or settings.targets_parameter(f"{record.name}.weight")
            if not wrapped and not settings.targets(record.name, placement.module.is_linear):
                raise BadInputError(
                    f"holds {kind} weights for {record.name!r}, which adapter_config.json does not target",
                    path=adapter.weights_file,
                    fix="fix target_modules or re-save the adapter",
                )
    for where, name in modules.items():
        module = binder.resolve(name).module
        if module.packed is not None:
            continue  # where the loaded model packs it, only target_parameters reaches it
        targeted = module.layout is not Layout.NORM and settings.targets(name, module.is_linear)
        if targeted and where not in have:
            raise BadInputError(
                f"has no {kind} weights for {name!r}, which adapter_config.json targets",
                path=adapter.weights_file,
                fix="the adapter file is incomplete; re-save it",
            )
