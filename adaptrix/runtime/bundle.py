"""The hooks bundle format: manifest.json's "bundle" section and one safetensors file of deltas.

A bundle holds, per module of the base (its name as in the base's checkpoint), what to add to
the module's output, already in the module's own layout: fused projections (GPT-2 c_attn,
GPT-NeoX query_key_value, Phi-3 qkv_proj / gate_up_proj) get one fused low-rank pair, and every
module is seen as a linear map from `in_features` to `out_features`:

- `lora`: `down` = A.T [in, rank] and `up` = (scale * B).T [rank, out]: the module's output gains
  x @ down @ up (scale is recorded, and already folded in). For an embedding, `in` is the
  vocabulary and x @ down is a row lookup: down [num, rank], up [rank, dim].
- `dora`: a magnitude [out]; the output becomes PEFT's DoRA: m * (W x) + bias + m * scale * B A x
  with m = magnitude / ||W + scale * B A|| per output feature, computed when attached.
- `bias`: a delta [out] added to the output.
- `replace`: new values for the module's parameters, in the module's own layout.
- `dense` (format 2): a dense delta [in, out] (PEFT LoHa / LoKr, computed at compile time): the
  output gains x @ dense.
- `scale_out` / `scale_in` (format 2): PEFT IA3's vectors [out] / [in]: the output (after the
  deltas above, before `bias`) or the input is multiplied by 1 + s * (v - 1) at handle scale s,
  which is exactly out = (1 - s) * base + s * adapted for that module.
- `probe`: a few elements of the base's stored weight, so that a bundle refuses another base.

`bottlenecks` (format 3): AdapterHub bottleneck adapters, one entry per layer and block, run by
`adaptrix.runtime.bottleneck` (which documents the entry and what the hooks compute).

This module reads bundles; it needs torch and safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adaptrix.runtime.bottleneck import BottleneckEntry, check_bottleneck_tensors, parse_bottleneck
from adaptrix.toolchain.errors import BadInputError
from adaptrix.toolchain.finite import all_finite

__all__ = [
    "BOTTLENECK_FORMAT",
    "BUNDLE_FORMAT",
    "KINDS_FORMAT",
    "TENSORS_FILE",
    "Bundle",
    "ModuleEntry",
    "load_bundle",
    "probe_indices",
]

BUNDLE_FORMAT = 1
KINDS_FORMAT = 2  # a bundle with dense or scale entries: a reader of format 1 must refuse it
BOTTLENECK_FORMAT = 3  # a bundle with bottleneck entries: readers of formats 1 and 2 must refuse it
TENSORS_FILE = "bundle.safetensors"
MANIFEST_NAME = "manifest.json"
LAYOUTS = ("linear", "conv1d", "embedding", "norm")
_PROBES = 8


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    """What a bundle does to one module of the base."""

    name: str
    layout: str
    sites: tuple[str, ...]
    weight_shape: tuple[int, ...]
    out_features: int
    probe_at: torch.Tensor  # flat indices into the base's stored weight
    probe_values: torch.Tensor  # the values there, float32
    probe_dtype: str  # the dtype they were stored in
    lora: dict | None
    dora: dict | None
    bias: str | None
    replace: dict[str, str]
    dense: str | None = None
    scale_out: str | None = None
    scale_in: str | None = None


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle read into memory: its manifest section, module entries and tensors (on CPU)."""

    path: Path
    manifest: dict
    modules: tuple[ModuleEntry, ...]
    tensors: dict[str, torch.Tensor]
    bottlenecks: tuple[BottleneckEntry, ...] = ()
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def prepared(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of the bundle on a device in a dtype: made once, then shared by every attach."""
        cache_key = (key, str(device), dtype)
        if cache_key not in self._prepared:
            with torch.inference_mode(False):
                self._prepared[cache_key] = self.tensors[key].to(device, dtype)
        return self._prepared[cache_key]

    def derived(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor made from the bundle's (q, k, v's downs side by side): made once, then shared."""
        if key not in self._prepared:
            with torch.inference_mode(False):
                self._prepared[key] = make()
        return self._prepared[key]

    @property
    def base(self) -> dict:
        """What the bundle was compiled for: model_type, config values, probes' source."""
        return self.manifest["bundle"]["base"]

    @property
    def dtype(self) -> str:
        """The dtype the deltas are stored in."""
        return self.manifest["bundle"]["dtype"]


def probe_indices(numel: int) -> list[int]:
    """Flat indices of the elements a probe samples from a weight of `numel` elements."""
    if numel <= _PROBES:
        return list(range(numel))
    return sorted({(k * numel) // _PROBES + (k * 7919) % max(1, numel // _PROBES) for k in range(_PROBES)})


def load_bundle(path: Path | str) -> Bundle:
    """Read a bundle directory; a malformed one is an error that names the file."""
    root = Path(path)
    manifest_file = root / MANIFEST_NAME
    if not manifest_file.is_file():
        raise BadInputError(
            "is not a hooks bundle (no manifest.json)",
            path=root,
            fix="compile one with `adaptrix compile ADAPTER --base BASE --target hooks -o BUNDLE`",
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"is not valid JSON ({exc})", path=manifest_file) from None
    section = manifest.get("bundle") if isinstance(manifest, dict) else None
    if not isinstance(section, dict):
        target = manifest.get("target") if isinstance(manifest, dict) else None
        raise BadInputError(
            f"describes a {target or 'non-bundle'} artifact, not a hooks bundle",
            path=manifest_file,
            fix="compile the adapter with --target hooks",
        )
    if section.get("format_version") not in (BUNDLE_FORMAT, KINDS_FORMAT, BOTTLENECK_FORMAT):
        raise BadInputError(
            f"has bundle format {section.get('format_version')!r}; this adaptrix reads {BUNDLE_FORMAT} "
            f"to {BOTTLENECK_FORMAT}",
            path=manifest_file,
            fix="recompile the bundle with this version of adaptrix",
        )
    tensors = _load_tensors(root / section.get("tensors_file", TENSORS_FILE))
    modules = tuple(_entry(raw, manifest_file) for raw in section.get("modules", []))
    _check_tensors(modules, tensors, root / section.get("tensors_file", TENSORS_FILE))
    bottlenecks = tuple(parse_bottleneck(raw, manifest_file) for raw in section.get("bottlenecks", []))
    hidden = int(section.get("base", {}).get("dimensions", {}).get("hidden_size", 0))
    for entry in bottlenecks:
        check_bottleneck_tensors(entry, tensors, hidden, root / section.get("tensors_file", TENSORS_FILE))
    return Bundle(root, manifest, modules, tensors, bottlenecks)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise BadInputError("is missing", path=file, fix="the bundle is incomplete; compile it again")
    try:
        with torch.inference_mode(False):  # inference tensors could not serve a later forward with grad
            return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise BadInputError(f"cannot be read ({exc})", path=file, fix="compile the bundle again") from None


def _entry(raw: object, file: Path) -> ModuleEntry:
    try:
        entry = ModuleEntry(
            name=str(raw["name"]),
            layout=str(raw["layout"]),
            sites=tuple(raw["sites"]),
            weight_shape=tuple(int(n) for n in raw["weight_shape"]),
            out_features=int(raw["out_features"]),
            probe_at=torch.tensor(raw["probe"]["indices"], dtype=torch.long),
            probe_values=torch.tensor(raw["probe"]["values"], dtype=torch.float32),
            probe_dtype=str(raw["probe"].get("dtype", "float32")),
            lora=raw.get("lora"),
            dora=raw.get("dora"),
            bias=raw.get("bias"),
            replace=dict(raw.get("replace") or {}),
            dense=raw.get("dense"),
            scale_out=raw.get("scale_out"),
            scale_in=raw.get("scale_in"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"has a malformed module entry ({exc!r})", path=file) from None
    if entry.layout not in LAYOUTS:
        raise BadInputError(f"module {entry.name!r} has unknown layout {entry.layout!r}", path=file)
    return entry


def _check_tensors(modules: tuple[ModuleEntry, ...], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Every tensor an entry names exists, with the shape the entry implies, and is finite."""
    for entry in modules:
        expected: dict[str, tuple[int, ...] | None] = {}
        if entry.lora:
            rank, in_features = int(entry.lora["rank"]), _in_features(entry)
            expected[entry.lora["down"]] = (in_features, rank)
            expected[entry.lora["up"]] = (rank, entry.out_features)
        if entry.dora:
            expected[entry.dora["magnitude"]] = (entry.out_features,)
        if entry.bias:
            expected[entry.bias] = (entry.out_features,)
        if entry.dense:
            expected[entry.dense] = (_in_features(entry), entry.out_features)
        if entry.scale_out:
            expected[entry.scale_out] = (entry.out_features,)
        if entry.scale_in:
            expected[entry.scale_in] = (_in_features(entry),)
        expected.update((key, None) for key in entry.replace.values())
        for key, shape in expected.items():
            tensor = tensors.get(key)
            if tensor is None:
                raise BadInputError(f"lacks tensor {key!r}", path=file, fix="compile the bundle again")
            if shape is not None and tuple(tensor.shape) != shape:
                raise BadInputError(
                    f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)}", path=file
                )
            if tensor.is_floating_point() and not all_finite(tensor):
                raise BadInputError(f"tensor {key!r} holds NaN or Inf", path=file, fix="compile it again")


def _in_features(entry: ModuleEntry) -> int:
    """The width a module's input has, seen as a linear map (the vocabulary for an embedding)."""
    shape = entry.weight_shape
    if entry.layout == "linear":
        return shape[1]
    return shape[0]  # conv1d [in, out], embedding [num, dim]
