"""The `hooks` target: a bundle of unmerged deltas that `adaptrix.attach` hooks onto a model.

Fused projections are handled here, at compile time: the roles of a fused module become one
low-rank pair in the module's own output layout, so the runtime only ever adds B @ A @ x to a
module's output. The bundle format is described in `adaptrix.runtimes.hooks.bundle`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptrix.binders.table import Layout, Placement, fuse_rows, split_rows
from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint
from adaptrix.io.safetensors_io import read_elements
from adaptrix.ir.bottleneck import Bottleneck
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, Bias, DoRA, Factored, LowRank, Op, Replace, Role, Scale, Site
from adaptrix.lowering.bottleneck_entries import bottleneck_entries
from adaptrix.lowering.head import refuse_new_head
from adaptrix.lowering.merge_math import merge_tensor
from adaptrix.runtimes.hooks.bundle import (
    BOTTLENECK_FORMAT,
    BUNDLE_FORMAT,
    KINDS_FORMAT,
    TENSORS_FILE,
    probe_indices,
)
from adaptrix.targets.hooks.write.kinds import compact_factored, dense_delta, input_scale, output_scale
from adaptrix.targets.written import Written

__all__ = ["EntryBuilder", "TouchedModule", "touched_modules", "write_hooks"]


_KIND_KEYS = ("dense", "scale_out", "scale_in")


@dataclass(frozen=True, slots=True)
class TouchedModule:
    """One module of the base the adapter touches, with the ops at each of its roles."""

    placement: Placement
    weight: str  # the stored tensor holding the module's weight (the embedding for a tied head)
    role_ops: tuple[tuple[Op, ...], ...]


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
    section = {
        "format_version": version,  # older readers refuse what they lack
        "tensors_file": TENSORS_FILE,
        "dtype": str(dtype).removeprefix("torch."),
        "base": _base_section(base),
        "modules": entries,
        **({"bottlenecks": bottlenecks} if bottlenecks else {}),
    }
    return Written([TENSORS_FILE], {"bundle": section})


def touched_modules(ir: AdapterIR, base: Checkpoint) -> list[TouchedModule]:
    """The base's modules that have ops, in checkpoint order; every site must find its module."""
    by_site = ir.by_site()
    names = base.module_names()  # a tied head is listed though it has no tensor
    placements = {name: p for name in names if (p := base.binder.resolve(name)) is not None}
    embed = next(
        (f"{n}.weight" for n, p in placements.items()
         if p.module.roles == (Role.EMBED,) and f"{n}.weight" in base.tensors),
        None,
    )  # fmt: skip
    modules, used = [], set()
    for name, placement in placements.items():
        role_ops = tuple(tuple(by_site.get(Site(placement.layer, r), ())) for r in placement.module.roles)
        if not any(role_ops) or any(Site(placement.layer, r) in used for r in placement.module.roles):
            continue
        weight = f"{name}.weight"
        if weight not in base.tensors:
            if placement.module.roles != (Role.LM_HEAD,) or embed is None:
                continue
            weight = embed
        used.update(Site(placement.layer, r) for r in placement.module.roles)
        modules.append(TouchedModule(placement, weight, role_ops))
    if missing := [site for site in ir.sites() if site not in used]:
        refuse_new_head(ir, base, missing)  # a classifier head the base has not: --target merged adds it
        raise BadInputError(
            f"{missing[0]}: the base has no module for it",
            path=base.path,
            fix="use the base the adapter was made for",
        )
    return modules


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
        }

    @staticmethod
    def _of(ops: tuple[Op, ...], kind) -> list:
        return [op for op in ops if isinstance(op, kind)]

    def _put(self, suffix: str, value: torch.Tensor) -> str:
        key = f"{self.name}.{suffix}"
        self.tensors[key] = value.to(self.dtype).contiguous()
        return key

    def _probe(self) -> dict:
        indices = probe_indices(math.prod(self.info.shape))
        values = read_elements(self.info, indices)
        dtype = str(self.info.dtype).removeprefix("torch.")
        return {"tensor": self.module.weight, "dtype": dtype, "indices": indices, "values": values.tolist()}

    def lora(self, weight_ops: list[list[Op]]) -> dict:
        """One low-rank pair for the whole module: roles sharing an A share its rank."""
        groups: dict[tuple[int, float], tuple[torch.Tensor, list]] = {}
        for rows, ops in zip(self.rows or [None], weight_ops, strict=True):
            for op in ops:
                low_rank = op.low_rank if isinstance(op, DoRA) else op
                key = (id(low_rank.a), low_rank.scale)
                if key not in groups:
                    groups[key] = (low_rank.a.load(), [])
                groups[key][1].append((rows, low_rank.b))
        downs, ups = [], []
        for (_, scale), (a, parts) in groups.items():
            b = torch.zeros(self._canonical_out(), a.shape[0])
            for rows, part in parts:
                b[slice(None) if rows is None else rows] = part.load()
            downs.append(a)
            ups.append(b * scale)  # each group's scale folded into its B
        a, b = torch.cat(downs), torch.cat(ups, 1)
        scales = {scale for _, scale in groups}
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
