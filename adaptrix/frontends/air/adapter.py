"""AIR frontend: an AIR file (docs/air.md) -> AdapterIR, every tensor placed and its shape checked.

The tensors stay lazy: each is read, and checked finite, when a target or pass loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from adaptrix.frontends.air.metadata import OpSpec, parse_metadata
from adaptrix.io.air_format import FILE_NAME, parse_key, slot_suffix
from adaptrix.io.safetensors_io import TensorInfo, read_header, read_tensor
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.role_shapes import role_shape
from adaptrix.ir.values import AdapterIR, Bias, DoRA, LazyTensor, LowRank, Op, Replace, Site, SourceModel

__all__ = ["AirAdapter", "air_file", "is_air", "read_air"]

_FIX = "the file is not a valid AIR file: re-create it with `adaptrix convert ADAPTER --to air`"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True, slots=True)
class AirAdapter:
    """A read AIR file: its ops (tensors still lazy), the model it was made for, its provenance."""

    path: Path
    name: str
    source: SourceModel
    ops: tuple[tuple[Site, Op], ...]
    provenance: Mapping[str, object]

    def files(self) -> list[Path]:
        """The files the adapter was read from."""
        return [self.path]

    def ir(self) -> AdapterIR:
        """The adapter as IR, for the model it was made for."""
        return AdapterIR(self.ops, self.source, name=self.name)


def air_file(path: Path | str) -> Path:
    """The AIR file a path names: the path itself, or a directory's adapter.air.safetensors."""
    path = Path(path)
    return path / FILE_NAME if path.is_dir() else path


def is_air(path: Path | str) -> bool:
    """Whether a path is given as AIR: a file, or a directory holding adapter.air.safetensors."""
    path = Path(path)
    return path.is_file() or (path / FILE_NAME).is_file()


def read_air(path: Path | str) -> AirAdapter:
    """Read and check an AIR file: version, metadata schema, every tensor placed, shapes consistent."""
    file = air_file(path)
    if not file.is_file():
        raise BadInputError("does not exist", path=file, fix="pass an AIR file or a PEFT adapter directory")
    infos, metadata = read_header(file)
    parsed = parse_metadata(metadata, file)
    tensors = {key: _lazy(file, info) for key, info in infos.items()}
    placer = _Placer(file, parsed.source, tensors)
    ops = tuple((spec.site, placer.op(spec, index)) for index, spec in enumerate(parsed.ops))
    if unused := [key for key in infos if key not in placer.first_use]:
        raise BadInputError(
            f"holds tensor {unused[0]!r}, which no op in the metadata uses", path=file, fix=_FIX
        )
    adapter = AirAdapter(file, parsed.name, parsed.source, ops, parsed.provenance)
    try:
        adapter.ir()
    except BadInputError as exc:
        raise BadInputError(exc.message, path=file, fix=_FIX) from None
    return adapter


def _lazy(file: Path, info: TensorInfo) -> LazyTensor:
    if parse_key(info.name) is None:
        raise BadInputError(
            f"holds tensor {info.name!r}, which is not an AIR key "
            "(layers.N.ROLE.lora_A, ROLE.bias_delta, ...)",
            path=file,
            fix=_FIX,
        )
    if info.dtype not in _FLOATS:
        raise BadInputError(f"holds tensor {info.name!r} as {info.dtype}; AIR tensors are floating point",
                            path=file, fix=_FIX)  # fmt: skip
    loader = partial(read_tensor, file, info.name)
    return LazyTensor(info.shape, f"{file}:{info.name}", loader, info.dtype.itemsize)


class _Placer:
    """Places the tensors named by each op spec, checking names and shapes."""

    def __init__(self, file: Path, source: SourceModel, tensors: dict[str, LazyTensor]):
        self.file, self.source, self.tensors = file, source, tensors
        self.first_use: dict[str, tuple[Site, int, str]] = {}
        self._site_count: dict[Site, int] = {}

    def op(self, spec: OpSpec, index: int) -> Op:
        """The IR op of one metadata entry."""
        at_site = self._site_count.get(spec.site, 0)
        self._site_count[spec.site] = at_site + 1
        where = f"op {index} ({spec.site} {spec.kind})"
        if spec.site.layer is not None and spec.site.layer >= self.source.num_layers:
            raise BadInputError(f"{where}: its source model has {self.source.num_layers} layers",
                                path=self.file, fix=_FIX)  # fmt: skip
        slots = {slot: self._tensor(spec, at_site, slot, key, where) for slot, key in spec.tensors.items()}
        out_rows, in_cols = role_shape(spec.site.role, self.source)
        if spec.kind in ("lora", "dora"):
            if in_cols == 0:
                raise BadInputError(
                    f"{where}: a norm has no matrix for a low-rank op", path=self.file, fix=_FIX
                )
            self._shape(where, "A", slots["A"], (spec.rank, in_cols))
            self._shape(where, "B", slots["B"], (out_rows, spec.rank))
            low_rank = LowRank(slots["A"], slots["B"], spec.scale)
            if spec.kind == "lora":
                return low_rank
            size = in_cols if spec.per_column else out_rows
            self._shape(where, "magnitude", slots["magnitude"], (size,))
            return DoRA(low_rank, slots["magnitude"], spec.per_column)
        if spec.kind == "bias":
            self._shape(where, "delta", slots["delta"], (out_rows,))
            return Bias(slots["delta"])
        for param, tensor in slots.items():
            if param == "bias" or (param == "weight" and in_cols == 0):
                self._shape(where, param, tensor, (out_rows,))
            elif param == "weight":
                self._shape(where, param, tensor, (out_rows, in_cols))
        return Replace(slots)

    def _tensor(self, spec: OpSpec, at_site: int, slot: str, key: str, where: str) -> LazyTensor:
        if key not in self.tensors:
            raise BadInputError(f"{where} names tensor {key!r}, which the file does not hold",
                                path=self.file, fix=_FIX)  # fmt: skip
        parts = parse_key(key)
        suffix = slot_suffix(spec.kind, slot)
        if parts.suffix != suffix:
            raise BadInputError(f"{where} puts tensor {key!r} in slot {slot}, whose keys end in {suffix}",
                                path=self.file, fix=_FIX)  # fmt: skip
        if key not in self.first_use:
            if (parts.site, parts.op_index) != (spec.site, at_site):
                raise BadInputError(
                    f"{where} is the first to use tensor {key!r}, whose name places it elsewhere",
                    path=self.file,
                    fix=_FIX,
                )
            self.first_use[key] = (spec.site, at_site, slot)
        return self.tensors[key]

    def _shape(self, where: str, slot: str, tensor: LazyTensor, expected: tuple[int | None, ...]) -> None:
        found = tensor.shape
        if len(found) == len(expected) and all(
            e is None or e == f for e, f in zip(expected, found, strict=True)
        ):
            return
        want = ["?" if e is None else e for e in expected]
        source = self.source
        raise BadInputError(
            f"{where}: tensor {tensor.origin.rpartition(':')[2]!r} ({slot}) has shape {list(found)}, "
            f"expected [{', '.join(map(str, want))}] for a {source.arch} of hidden {source.hidden_size}, "
            f"{source.num_heads} heads ({source.num_kv_heads} kv) of {source.head_dim}, "
            f"intermediate size {source.intermediate_size}, vocabulary {source.vocab_size}",
            path=self.file,
            fix=_FIX,
        )
