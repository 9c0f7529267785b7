"""What an adapter holds, per site or per module: ranks, scales, parameters, bytes."""

from __future__ import annotations

from pathlib import Path

from adaptrix.api.inspect_onnx import inspect_onnx_adapter, is_onnx_adapter
from adaptrix.api.inspect_rows import site_rows
from adaptrix.api.route import route_overview
from adaptrix.artifacts import MANIFEST_NAME, PEFT_CONFIG_NAME
from adaptrix.frontends.adapterhub.adapter import is_adapterhub
from adaptrix.frontends.air.adapter import is_air, read_air
from adaptrix.frontends.air.lower import lower_air
from adaptrix.frontends.peft.adapter import lower_peft
from adaptrix.frontends.peft.weights import PeftAdapter, read_peft
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hub import resolve_base
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import (
    LazyTensor,
)

__all__ = ["inspect_adapter", "inspect_air", "inspect_bundle"]

_FACTOR_KINDS = {"hada_": "loha", "lokr_": "lokr", "ia3_l": "ia3", "vera_": "vera"}


def inspect_adapter(adapter: Path | str, base: Path | str | None = None) -> dict:
    """Describe an adapter (per IR site with a base, else per PEFT module), a bundle or an .onnx_adapter."""
    base = None if base is None else resolve_base(base)
    if is_onnx_adapter(adapter):
        return inspect_onnx_adapter(adapter)
    if _is_output(Path(adapter)):
        manifest = read_json(Path(adapter) / MANIFEST_NAME, what="manifest")
        hooks = isinstance(manifest, dict) and manifest.get("target") == "hooks"
        found = inspect_bundle(adapter) if hooks else inspect_artifact(adapter, manifest)
        routing = route_overview(adapter, manifest) if isinstance(manifest, dict) else None
        return {**found, **({"route": routing} if routing else {})}
    if is_air(adapter) and not (Path(adapter) / PEFT_CONFIG_NAME).is_file():
        return inspect_air(adapter, base)
    if is_adapterhub(Path(adapter)):
        from adaptrix.api.inspect_hub import inspect_adapterhub

        return inspect_adapterhub(adapter, base)
    peft_adapter = read_peft(adapter)
    settings = peft_adapter.settings
    summary = {
        "adapter": str(adapter),
        "format": f"peft-{settings.peft_type.lower()}",
        "r": None if settings.peft_type == "IA3" else settings.r,
        "lora_alpha": settings.lora_alpha if settings.peft_type in ("LORA", "LOHA", "LOKR") else None,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "bias": settings.bias,
        "modules_to_save": list(settings.modules_to_save),
        **({"feedforward_modules": settings.feedforward_modules} if settings.peft_type == "IA3" else {}),
    }
    if base is None:
        rows, tensors = _module_rows(peft_adapter)
    else:
        checkpoint = Checkpoint(base)
        ir = lower_peft(peft_adapter, checkpoint)
        summary["base"] = str(base)
        summary["source"] = ir.source.as_dict()
        rows, tensors = site_rows(ir)
    layers = sorted({row["layer"] for row in rows if row["layer"] is not None})
    summary.update(
        layers=layers,
        roles=sorted({row["role"] for row in rows if row.get("role")}),
        parameters=sum(t.numel for t in tensors.values()),
        bytes=sum(t.nbytes for t in tensors.values()),
        rows=rows,
    )
    return summary


def inspect_air(path: Path | str, base: Path | str | None = None) -> dict:
    """Describe an AIR file per site: its source model, provenance, ranks, scales and sizes."""
    air = read_air(path)
    ir = air.ir() if base is None else lower_air(air, Checkpoint(base))
    rows, tensors = site_rows(ir)
    return {
        "adapter": str(path),
        "format": "air",
        "source": air.source.as_dict(),
        "provenance": dict(air.provenance),
        **({} if base is None else {"base": str(base)}),
        "layers": sorted({row["layer"] for row in rows if row["layer"] is not None}),
        "roles": sorted({row["role"] for row in rows}),
        "parameters": sum(t.numel for t in tensors.values()),
        "bytes": sum(t.nbytes for t in tensors.values()),
        "rows": rows,
    }


def inspect_bundle(path: Path | str) -> dict:
    """Describe a hooks bundle per module: its ops, rank, scale, parameters and bytes."""
    from adaptrix.runtimes.hooks.bundle import load_bundle
    from adaptrix.runtimes.hooks.route import route_tensors

    bundle = load_bundle(path)
    rows = []
    for entry in bundle.modules:
        keys = [entry.lora["down"], entry.lora["up"]] if entry.lora else []
        keys += [entry.dora["magnitude"]] if entry.dora else []
        keys += [entry.bias] if entry.bias else []
        keys += list(entry.replace.values())
        keys += [key for key in (entry.dense, entry.scale_out, entry.scale_in) if key]
        keys += sorted(route_tensors(entry.route))
        tensors = [bundle.tensors[key] for key in keys]
        ops = [kind for kind, there in (("lora", entry.lora and not entry.dora), ("dora", entry.dora),
               ("dense", entry.dense), ("ia3-out", entry.scale_out), ("ia3-in", entry.scale_in),
               ("bias", entry.bias), ("replace", entry.replace), ("route", entry.route))
               if there]  # fmt: skip
        rows.append(
            {
                "module": entry.name,
                "layer": _layer_of(entry.name),
                "sites": list(entry.sites),
                "op": "+".join(ops),
                "rank": entry.lora["rank"] if entry.lora else None,
                "scale": entry.lora.get("scale") if entry.lora else None,
                "parameters": sum(t.numel() for t in tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
            }
        )
    stored = {}
    for entry in bundle.bottlenecks:
        tensors = {key: bundle.tensors[key] for key in entry.tensors.values()}
        new = {key: t for key, t in tensors.items() if key not in stored}  # shared tensors count once
        stored.update(tensors)
        rows.append(
            {
                "module": entry.name,
                "layer": _layer_of(entry.name),
                "sites": list(entry.sites),
                "op": "bottleneck",
                "size": entry.size,
                "act": entry.act,
                "placement": f"{'parallel to' if entry.parallel else 'after'} {entry.block}",
                "scale": entry.scale,
                "shared": sorted(tensors.keys() - new.keys()) or None,
                "parameters": sum(t.numel() for t in new.values()),
                "bytes": sum(t.numel() * t.element_size() for t in new.values()),
            }
        )
    base = bundle.base
    return {
        "adapter": str(path),
        "format": "adaptrix-hooks-bundle",
        "dtype": bundle.dtype,
        "base": {"model_type": base["model_type"], **base["dimensions"]},
        "layers": sorted({row["layer"] for row in rows if row["layer"] is not None}),
        "roles": sorted({site.rpartition(" ")[2] for row in rows for site in row["sites"]}),
        "parameters": sum(row["parameters"] for row in rows),
        "bytes": sum(row["bytes"] for row in rows),
        "rows": rows,
    }


def inspect_artifact(path: Path | str, manifest: object = None) -> dict:
    """Describe a compiled artifact other than a hooks bundle from its manifest: target, sites, files.

    `manifest`: its manifest.json as read already (else it is read here).
    """
    path = Path(path)
    if manifest is None:
        manifest = read_json(path / MANIFEST_NAME, what="manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("target"), str):
        raise BadInputError("is not an Adaptrix output (its manifest names no target)",
                            path=path / MANIFEST_NAME,
                            fix="inspect an adapter, a hooks bundle or a compiled artifact")  # fmt: skip
    outputs = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
    files = [name for name in outputs if isinstance(name, str) and name and Path(name).name == name]
    rows = [{"module": name, "op": "file", "bytes": (path / name).stat().st_size
             if (path / name).is_file() else None} for name in sorted(files)]  # fmt: skip
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    return {
        "adapter": str(path),
        "format": f"{manifest['target']} artifact",
        "target": manifest["target"],
        "dtype": manifest.get("dtype"),
        "sites": manifest.get("sites"),
        "arch": source.get("arch"),
        "passes": [p.get("name") for p in manifest.get("passes") or [] if isinstance(p, dict)],
        "layers": [],
        "parameters": 0,
        "bytes": sum(row["bytes"] or 0 for row in rows),
        "rows": rows,
    }


def _is_output(path: Path) -> bool:
    """Whether `path` is an Adaptrix output (its manifest.json), not a PEFT adapter directory."""
    manifest = path / MANIFEST_NAME
    return manifest.is_file() and not (path / PEFT_CONFIG_NAME).is_file()


def _module_rows(adapter: PeftAdapter) -> tuple[list[dict], dict[int, LazyTensor]]:
    rows, unique = [], {t.origin: t for t in adapter.shared.values()}  # VeRA's projections, once
    settings = adapter.settings
    ranked = settings.peft_type != "IA3"
    for record in adapter.modules.values():
        tensors = [
            t
            for t in (record.lora_a, record.lora_b, record.embedding_a, record.embedding_b,
                      record.magnitude, record.lora_b_bias, *record.params.values(), *record.factors.values())
            if t is not None
        ]  # fmt: skip
        unique.update((id(t), t) for t in tensors)
        rows.append(
            {
                "module": record.name,
                "layer": _layer_of(record.name),
                "op": _module_kind(record),
                "rank": settings.rank(record.name) if record.has_delta and ranked else None,
                "scale": settings.scale(record.name) if record.has_lora or _scaled(record) else None,
                "parameters": sum(t.numel for t in tensors),
                "bytes": sum(t.nbytes for t in tensors),
            }
        )
    return rows, unique


def _scaled(record) -> bool:
    """Whether the module's kind has PEFT's alpha / r scale (LoHa, LoKr)."""
    return any(name.startswith(("hada_", "lokr_")) for name in record.factors)


def _module_kind(record) -> str:
    for name in record.factors:
        return next(kind for prefix, kind in _FACTOR_KINDS.items() if name.startswith(prefix))
    if record.has_lora:
        return "dora" if record.magnitude is not None else "lora"
    return "bias" if set(record.params) == {"bias"} else "replace"


def _layer_of(name: str) -> int | None:
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None
