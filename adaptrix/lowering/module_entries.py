"""One touched module's deltas in the module's own layout: a bundle entry and its tensors.

Fused projections are handled here: the roles of a fused module become one low-rank pair in the
module's own output layout, so a runtime only ever adds B @ A @ x to a module's output. The
hooks target writes these entries; the ONNX target and the passes that train read their pairs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from adaptrix.artifacts import probe_indices
from adaptrix.binders.table import Layout, fuse_rows, split_rows
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import Bias, DoRA, Factored, LowRank, Op, Replace, Scale, Site
from adaptrix.lowering.factored_entries import compact_factored, dense_delta, input_scale, output_scale
from adaptrix.lowering.merge_math import merge_tensor
from adaptrix.lowering.peft_modules import grouped_pairs
from adaptrix.lowering.route_entries import route_entry, routed_pairs
from adaptrix.lowering.touched import TouchedModule

__all__ = ["EntryBuilder"]


class EntryBuilder:
    """Builds one module's manifest entry and its tensors, fusing its roles back together."""

    def __init__(self, module: TouchedModule, base: Checkpoint, dtype: torch.dtype):
        self.module, self.base, self.dtype = module, base, dtype
        self.name = module.placement.name
        self.layout = module.placement.module.layout
        self.info = base.tensors[module.weight]
        self.rows = split_rows(module.placement.module.split, base.source)
        self.tensors: dict[str, torch.Tensor] = {}
        if self.layout in (Layout.LINEAR, Layout.CONV1D):  # LoHa / LoKr as LoRA where that is smaller
            inner = self.info.shape[1 if self.layout is Layout.LINEAR else 0]
            self.module = replace(
                module, role_ops=compact_factored(module.role_ops, self._canonical_out(), inner)
            )

    @property
    def out_features(self) -> int:
        """The module's output size."""
        shape = self.info.shape
        return shape[0] if self.layout is Layout.LINEAR else shape[-1]

    def entry(self) -> dict:
        """The module's manifest entry (its tensors go into `self.tensors`)."""
        weight_ops = [self._of(ops, LowRank | DoRA) for ops in self.module.role_ops]
        placement = self.module.placement
        sites = [str(Site(placement.layer, role)) for role, ops in zip(placement.module.roles,
                 self.module.role_ops, strict=True) if ops]  # fmt: skip
        return {
            "name": self.name,
            "layout": str(self.layout),
            "sites": sites,
            "weight_shape": list(self.info.shape),
            "out_features": self.out_features,
            "probe": self._probe(),
            "lora": self.lora(weight_ops) if any(weight_ops) else None,
            "dora": self._dora(weight_ops),
            "bias": self._bias(),
            "replace": self._replace(),
            **self.kinds(),
            **self._route(),
        }

    def _route(self) -> dict:
        """A routed module's `route` section (adaptrix.lowering.route_entries): the key only when used."""
        routed = routed_pairs(self.module.role_ops, self.rows, self._canonical_out(), self.layout, self.name)
        return {"route": route_entry(routed, self._put)} if routed is not None else {}

    @staticmethod
    def _of(ops: tuple[Op, ...], kind) -> list:
        return [op for op in ops if isinstance(op, kind)]

    def _put(self, suffix: str, value: torch.Tensor) -> str:
        key = f"{self.name}.{suffix}"
        self.tensors[key] = value.to(self.dtype).contiguous()
        return key

    def _probe(self) -> dict:
        indices = probe_indices(math.prod(self.info.shape))
        values = self.base.elements(self.module.weight, indices)
        dtype = str(self.info.dtype).removeprefix("torch.")
        return {"tensor": self.module.weight, "dtype": dtype, "indices": indices, "values": values.tolist()}

    def lora(self, weight_ops: list[list[Op]]) -> dict:
        """One low-rank pair for the whole module: roles sharing an A share its rank."""
        pairs = grouped_pairs(weight_ops, self.rows, self._canonical_out())
        a = torch.cat([down for down, _, _ in pairs])
        b = torch.cat([up * scale for _, up, scale in pairs], 1)  # each group's scale folded into its B
        scales = {scale for _, _, scale in pairs}
        # The runtime right-multiplies: x @ down @ up, so down = A.T [in, r] and up = (scale B).T [r, out].
        # An embedding's canonical delta is [num, dim] = (scale B) A: down = scale B [num, r], gathered by id.
        down, up = (b, a) if self.layout is Layout.EMBEDDING else (a.T, b.T)
        return {
            "rank": a.shape[0],
            "scale": scales.pop() if len(scales) == 1 else None,  # informative: it is folded into `up`
            "down": self._put("lora_down", down),
            "up": self._put("lora_up", up),
        }

    def kinds(self) -> dict[str, str]:
        """LoHa / LoKr kept dense as one delta [in, out], IA3 as scale vectors: keys only when used."""
        role_ops = self.module.role_ops
        if not any(isinstance(op, Factored | Scale) for ops in role_ops for op in ops):
            return {}
        if self.layout not in (Layout.LINEAR, Layout.CONV1D):
            raise UnsupportedError(f"has LoHa, LoKr or IA3 ops on a {self.layout} module",
                                   fix="use --target merged")  # fmt: skip
        shape = self.info.shape
        out, inner = self._canonical_out(), shape[1] if self.layout is Layout.LINEAR else shape[0]
        found = {
            "dense": (d.T if (d := dense_delta(role_ops, self.rows, (out, inner))) is not None else None),
            "scale_out": output_scale(role_ops, self.rows, out),
            "scale_in": input_scale(role_ops, inner),
        }
        return {key: self._put(key, value) for key, value in found.items() if value is not None}

    def _canonical_out(self) -> int:
        """Rows of the IR's canonical [out, in] delta (the vocabulary for an embedding)."""
        shape = self.info.shape
        return shape[1] if self.layout is Layout.CONV1D else shape[0]

    def _dora(self, weight_ops: list[list[Op]]) -> dict | None:
        found = [ops for ops in weight_ops if any(isinstance(op, DoRA) for op in ops)]
        if not found:
            return None
        if len(found) != len(weight_ops) or any(len(ops) != 1 for ops in weight_ops):
            raise UnsupportedError(
                "has DoRA on some roles of a fused module and not on others",
                fix="apply DoRA to the whole module, or use --target merged",
            )
        ops = [ops[0] for ops in weight_ops]
        magnitudes = [op.magnitude.load() for op in ops]
        magnitude = magnitudes[0] if self.rows is None else fuse_rows(magnitudes, self.rows)
        return {"magnitude": self._put("lora_magnitude", magnitude)}

    def _bias(self) -> str | None:
        ops = [self._of(ops, Bias) for ops in self.module.role_ops]
        if not any(ops):
            return None
        delta = torch.zeros(self.out_features)
        for rows, role_ops in zip(self.rows or [None], ops, strict=True):
            for op in role_ops:
                delta[slice(None) if rows is None else rows] += op.delta.load()
        return self._put("bias_delta", delta)

    def _replace(self) -> dict[str, str]:
        ops = [tuple(self._of(ops, Replace)) for ops in self.module.role_ops]
        params = sorted({param for role_ops in ops for op in role_ops for param in op.tensors})
        keys = {}
        for param in params:
            source = self.module.weight if param == "weight" else f"{self.name}.{param}"
            value = self.base.read(source)
            merged = merge_tensor(value, param, self.module.placement, ops, self.base.source, self.dtype)
            keys[param] = self._put(f"replace.{param}", merged)
        return keys
