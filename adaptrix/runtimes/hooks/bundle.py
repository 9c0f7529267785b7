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
`adaptrix.runtimes.hooks.bottleneck` (which documents the entry and what the hooks compute).

This module reads bundles; it needs torch and safetensors only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adaptrix.artifacts import (
    BOTTLENECK_FORMAT,
    BUNDLE_FORMAT,
    KINDS_FORMAT,
    MANIFEST_NAME,
    ROUTE_FORMAT,
    TENSORS_FILE,
    probe_indices,
)
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.finite import all_finite
from adaptrix.runtimes.hooks.bottleneck import BottleneckEntry, check_bottleneck_tensors, parse_bottleneck
from adaptrix.runtimes.hooks.bundle_schema import check_base, check_section, module_fields
from adaptrix.runtimes.hooks.route import check_route, route_shapes, route_tensors

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
    route: dict | None = None  # a routed module (adaptrix.runtimes.hooks.route)


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


def load_bundle(path: Path | str) -> Bundle:
    """Read and check a whole bundle directory; anything malformed is one error that names the file."""
    root = Path(path)
    manifest_file = root / MANIFEST_NAME
    if not manifest_file.is_file():
        raise BadInputError(
            "is not a hooks bundle (no manifest.json)",
            path=root,
            fix="compile one with `adaptrix compile ADAPTER --base BASE --target hooks -o BUNDLE`",
        )
    _inside(root, manifest_file)
    manifest = read_json(manifest_file, what="bundle manifest")
    section = manifest.get("bundle") if isinstance(manifest, dict) else None
    if not isinstance(section, dict):
        target = manifest.get("target") if isinstance(manifest, dict) else None
        raise BadInputError(
            f"describes a {target if isinstance(target, str) else 'non-bundle'} artifact, not a hooks bundle",
            path=manifest_file,
            fix="compile the adapter with --target hooks",
        )
    if section.get("format_version") not in (BUNDLE_FORMAT, KINDS_FORMAT, BOTTLENECK_FORMAT, ROUTE_FORMAT):
        raise BadInputError(
            f"has bundle format {section.get('format_version')!r:.40}; this adaptrix reads {BUNDLE_FORMAT} "
            f"to {ROUTE_FORMAT}",
            path=manifest_file,
            fix="recompile the bundle with this version of adaptrix",
        )
    check_section(section, manifest_file)
    base = check_base(section, manifest_file)
    modules = tuple(
        _entry(raw, manifest_file, number) for number, raw in enumerate(section.get("modules", []))
    )
    bottlenecks = tuple(parse_bottleneck(raw, manifest_file) for raw in section.get("bottlenecks", []))
    _check_unique([entry.name for entry in modules], manifest_file, "module")
    _check_unique([entry.name for entry in bottlenecks], manifest_file, "bottleneck")
    tensors_file = _bundle_file(root, section.get("tensors_file", TENSORS_FILE), manifest_file)
    tensors = _load_tensors(tensors_file)
    _check_tensors(modules, tensors, tensors_file, section["dtype"])
    hidden = base["dimensions"].get("hidden_size", 0)
    for entry in bottlenecks:
        check_bottleneck_tensors(entry, tensors, hidden, tensors_file)
    _check_all_used(modules, bottlenecks, tensors, tensors_file)
    return Bundle(root, manifest, modules, tensors, bottlenecks)


def _inside(root: Path, file: Path) -> Path:
    """`file`, after checking that it resolves inside the bundle directory (no symlink out of it)."""
    try:
        real_root, real = root.resolve(), file.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name the OS refuses
        raise BadInputError(
            f"cannot be resolved ({exc})", path=file, fix="compile the bundle again"
        ) from None
    if not real.is_relative_to(real_root):
        raise BadInputError(f"resolves to {real}, outside the bundle", path=file,
                            fix="a bundle's files must lie inside its directory; copy them in")  # fmt: skip
    return file


def _bundle_file(root: Path, name: object, manifest_file: Path) -> Path:
    """The bundle file a manifest names: a relative path inside the bundle, never `..` or absolute."""
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
        raise BadInputError(f"names tensors_file {name!r:.80}: expected a file name inside the bundle",
                            path=manifest_file, fix="compile the bundle again")  # fmt: skip
    return _inside(root, root / name)


def _check_unique(names: list[str], file: Path, kind: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BadInputError(f"lists {kind} {name!r} twice", path=file, fix="compile the bundle again")
        seen.add(name)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise BadInputError("is missing", path=file, fix="the bundle is incomplete; compile it again")
    try:
        with torch.inference_mode(False):  # inference tensors could not serve a later forward with grad
            return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise BadInputError(f"cannot be read ({reason})", path=file, fix="compile the bundle again") from None


def _entry(raw: object, file: Path, number: int) -> ModuleEntry:
    fields = module_fields(raw, file, number)
    indices, values, dtype = fields.pop("probe")
    if fields["route"] is not None:
        check_route(fields["route"], file, f"module {fields['name']!r}.route")
    return ModuleEntry(
        probe_at=torch.tensor(indices, dtype=torch.long),
        probe_values=torch.tensor(values, dtype=torch.float32),
        probe_dtype=dtype,
        **fields,
    )


def _check_tensors(
    modules: tuple[ModuleEntry, ...], tensors: dict[str, torch.Tensor], file: Path, dtype: str
) -> None:
    """Every tensor an entry names exists, with the shape the entry implies and the bundle's dtype."""
    for entry in modules:
        expected: dict[str, tuple[int, ...] | None] = {}
        if entry.lora:
            rank, in_features = entry.lora["rank"], _in_features(entry)
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
        if entry.route:
            expected.update(route_shapes(entry.route, _in_features(entry), entry.out_features))
        expected.update((key, None) for key in entry.replace.values())  # the module's own shape, at attach
        for key, shape in expected.items():
            tensor = tensors.get(key)
            if tensor is None:
                raise BadInputError(f"lacks tensor {key!r}", path=file, fix="compile the bundle again")
            if shape is not None and tuple(tensor.shape) != shape:
                raise BadInputError(
                    f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)}", path=file
                )
    for key, tensor in tensors.items():
        if str(tensor.dtype).removeprefix("torch.") != dtype:
            raise BadInputError(f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}, the "
                                f"manifest says the bundle is {dtype}", path=file,
                                fix="compile the bundle again")  # fmt: skip
        if not all_finite(tensor):
            raise BadInputError(f"tensor {key!r} holds NaN or Inf", path=file, fix="compile it again")


def _check_all_used(modules, bottlenecks, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """A tensor no entry names is refused: the file is not what the manifest describes."""
    used = {key for entry in bottlenecks for key in entry.tensors.values()}
    for entry in modules:
        used.update(key for key in (entry.bias, entry.dense, entry.scale_out, entry.scale_in) if key)
        used.update(entry.replace.values())
        used.update((entry.lora["down"], entry.lora["up"]) if entry.lora else ())
        used.update((entry.dora["magnitude"],) if entry.dora else ())
        used.update(route_tensors(entry.route))
    if stray := sorted(tensors.keys() - used):
        raise BadInputError(f"holds tensor {stray[0]!r}, which no entry of the manifest uses"
                            + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""),
                            path=file, fix="compile the bundle again")  # fmt: skip


def _in_features(entry: ModuleEntry) -> int:
    """The width a module's input has, seen as a linear map (the vocabulary for an embedding)."""
    shape = entry.weight_shape
    if entry.layout == "linear":
        return shape[1]
    return shape[0]  # conv1d [in, out], embedding [num, dim]
