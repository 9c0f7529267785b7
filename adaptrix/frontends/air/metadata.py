"""An AIR file's __metadata__: parsed and checked against the schema of docs/air.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

from adaptrix.frontends.peft.settings import MAX_SCALE
from adaptrix.io.air_format import FORMAT, FORMAT_VERSION, METADATA_KEYS, PARAM_NAME, SLOTS
from adaptrix.io.jsonfile import loads_strict
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Role, Site, SourceModel

__all__ = ["AirMetadata", "OpSpec", "parse_metadata"]

_FIX = "the file is not a valid AIR file: re-create it with `adaptrix convert ADAPTER --to air`"
# Op kind -> the entry fields it takes besides layer, role, op and tensors.
_FIELDS = {
    "lora": {"rank", "scale"},
    "dora": {"rank", "scale", "per_column"},
    "bias": set(),
    "replace": set(),
}


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One entry of the metadata's op list: where, what kind, and which tensor fills each slot."""

    site: Site
    kind: str
    tensors: Mapping[str, str]
    rank: int | None = None
    scale: float | None = None
    per_column: bool = False


@dataclass(frozen=True, slots=True)
class AirMetadata:
    """Everything an AIR file says besides its tensors."""

    name: str
    source: SourceModel
    ops: tuple[OpSpec, ...]
    provenance: Mapping[str, object]


def parse_metadata(metadata: Mapping[str, str], file: Path) -> AirMetadata:
    """Check an AIR file's __metadata__ and parse it; anything off is an error naming the file."""
    if not all(isinstance(value, str) for value in metadata.values()):
        raise BadInputError("has safetensors metadata values that are not strings", path=file, fix=_FIX)
    if metadata.get("format") != FORMAT:
        raise BadInputError(
            f"is not an AIR file (its safetensors metadata has no format = {FORMAT})",
            path=file,
            fix="pass an AIR file (written by `adaptrix convert ADAPTER --to air`) or a PEFT directory",
        )
    _check_version(metadata.get("format_version"), file)
    for key in metadata:
        if key not in METADATA_KEYS:
            raise BadInputError(f"has metadata key {key!r}, unknown to AIR version {FORMAT_VERSION}",
                                path=file, fix=_FIX)  # fmt: skip
    for key, required in METADATA_KEYS.items():
        if required and key not in metadata:
            raise BadInputError(f"has no metadata key {key!r}", path=file, fix=_FIX)
    provenance = _json(metadata, "provenance", dict, file)
    ops = _json(metadata, "ops", list, file)
    if not ops:
        raise BadInputError("holds no ops", path=file, fix=_FIX)
    return AirMetadata(
        name=str(metadata.get("name") or file.name.removesuffix(".safetensors").removesuffix(".air")),
        source=_source(_json(metadata, "source", dict, file), file),
        ops=tuple(_op(entry, i, file) for i, entry in enumerate(ops)),
        provenance=MappingProxyType(provenance),
    )


def _check_version(version: str | None, file: Path) -> None:
    if version is None or not version.isdigit():
        raise BadInputError(f"has format_version {version!r}, expected {FORMAT_VERSION}", path=file, fix=_FIX)
    if int(version) != FORMAT_VERSION:
        raise UnsupportedError(
            f"is AIR format_version {version}; this Adaptrix reads version {FORMAT_VERSION}",
            path=file,
            fix="use the Adaptrix version that wrote it, or re-convert the source adapter",
        )


def _json(metadata: Mapping[str, str], key: str, kind: type, file: Path):
    value = loads_strict(metadata[key], path=file, what=f"JSON in metadata {key!r}")
    if not isinstance(value, kind):
        raise BadInputError(f"has metadata {key!r} that is not a JSON {kind.__name__}", path=file, fix=_FIX)
    return value


_OPTIONAL_SOURCE = frozenset({"decoder_start"})  # only an encoder-decoder's source has it


def _source(raw: dict, file: Path) -> SourceModel:
    names = {f.name for f in fields(SourceModel)}
    if unknown := sorted(raw.keys() - names):
        raise BadInputError(f"has source field {unknown[0]!r}, unknown to AIR", path=file, fix=_FIX)
    if missing := sorted(names - raw.keys() - _OPTIONAL_SOURCE):
        raise BadInputError(f"has no source field {missing[0]!r}", path=file, fix=_FIX)
    for name, value in raw.items():
        kind = str if name == "arch" else bool if name == "tie_word_embeddings" else int
        good = isinstance(value, kind) and (kind is not int or (not isinstance(value, bool) and value > 0))
        if not good:
            raise BadInputError(f"has source {name} = {value!r}", path=file, fix=_FIX)
    if raw.get("decoder_start", 0) >= raw["num_layers"]:  # the decoder has a layer at least
        raise BadInputError(f"has source decoder_start = {raw['decoder_start']}, not below its num_layers = "
                            f"{raw['num_layers']}", path=file, fix=_FIX)  # fmt: skip
    return SourceModel(**raw)


def _op(entry: object, index: int, file: Path) -> OpSpec:
    where = f"op {index}"
    if not isinstance(entry, dict):
        raise BadInputError(f"{where} is not a JSON object", path=file, fix=_FIX)
    kind = entry.get("op")
    if kind not in _FIELDS:
        raise BadInputError(f"{where} has kind {kind!r}; expected one of {', '.join(_FIELDS)}",
                            path=file, fix=_FIX)  # fmt: skip
    site = _site(entry, where, file)
    where = f"op {index} ({site} {kind})"
    if unknown := sorted(entry.keys() - {"layer", "role", "op", "tensors"} - _FIELDS[kind]):
        raise BadInputError(f"{where} has field {unknown[0]!r}, unknown to AIR", path=file, fix=_FIX)
    spec = OpSpec(site, kind, MappingProxyType(_tensors(entry.get("tensors"), kind, where, file)))
    if kind in ("lora", "dora"):
        rank, scale = entry.get("rank"), entry.get("scale")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise BadInputError(
                f"{where} has rank {rank!r}; expected a positive integer", path=file, fix=_FIX
            )
        number = isinstance(scale, int | float) and not isinstance(scale, bool)
        if not number or not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise BadInputError(f"{where} has scale {scale!r}; expected a finite number below {MAX_SCALE:g}",
                                path=file, fix=_FIX)  # fmt: skip
        per_column = entry.get("per_column", False)
        if not isinstance(per_column, bool):
            raise BadInputError(f"{where} has per_column {per_column!r}; expected true or false",
                                path=file, fix=_FIX)  # fmt: skip
        spec = OpSpec(site, kind, spec.tensors, rank, float(scale), per_column)
    return spec


def _site(entry: dict, where: str, file: Path) -> Site:
    layer, role = entry.get("layer"), entry.get("role")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
        raise BadInputError(
            f"{where} has layer {layer!r}; expected null or an integer >= 0", path=file, fix=_FIX
        )
    if role not in tuple(Role):
        raise BadInputError(f"{where} has role {role!r}, unknown to AIR", path=file,
                            fix=f"roles are: {', '.join(Role)}")  # fmt: skip
    try:
        return Site(layer, Role(role))
    except ValueError as exc:
        raise BadInputError(f"{where}: {exc}", path=file, fix=_FIX) from None


def _tensors(raw: object, kind: str, where: str, file: Path) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise BadInputError(f"{where} has no tensors object of slot -> key", path=file, fix=_FIX)
    if kind == "replace":
        if not raw or not all(PARAM_NAME.fullmatch(p) for p in raw):
            raise BadInputError(f"{where} must name at least one parameter, each an identifier",
                                path=file, fix=_FIX)  # fmt: skip
    elif set(raw) != set(SLOTS[kind]):
        raise BadInputError(
            f"{where} fills slots {sorted(raw)}; a {kind} op has {list(SLOTS[kind])}", path=file, fix=_FIX
        )
    return dict(raw)
