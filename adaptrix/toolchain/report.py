"""What an adapter holds, per site or per module: ranks, scales, parameters, bytes."""

from __future__ import annotations

from pathlib import Path

from adaptrix.toolchain.checkpoint import Checkpoint
from adaptrix.toolchain.frontends.air import is_air, read_air
from adaptrix.toolchain.frontends.air_lower import lower_air
from adaptrix.toolchain.frontends.peft import lower_peft
from adaptrix.toolchain.frontends.peft_weights import PeftAdapter, read_peft
from adaptrix.toolchain.ir import AdapterIR, Bias, DoRA, LazyTensor, LowRank, Op, Replace, site_order

__all__ = ["inspect_adapter", "inspect_air", "inspect_bundle"]

_KINDS = {LowRank: "lora", DoRA: "dora", Bias: "bias", Replace: "replace"}


def inspect_adapter(adapter: Path | str, base: Path | str | None = None) -> dict:
    """Describe an adapter: per IR site when the base is known, else per PEFT module; or a bundle."""
    if _is_bundle(Path(adapter)):
        return inspect_bundle(adapter)
    if is_air(adapter) and not (Path(adapter) / "adapter_config.json").is_file():
        return inspect_air(adapter, base)
    peft_adapter = read_peft(adapter)
    settings = peft_adapter.settings
    summary = {
        "adapter": str(adapter),
        "format": "peft-lora",
        "r": settings.r,
        "lora_alpha": settings.lora_alpha,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "bias": settings.bias,
        "modules_to_save": list(settings.modules_to_save),
    }
    if base is None:
        rows, tensors = _module_rows(peft_adapter)
    else:
        checkpoint = Checkpoint(base)
        ir = lower_peft(peft_adapter, checkpoint)
        summary["base"] = str(base)
        summary["source"] = ir.source.as_dict()
        rows, tensors = _site_rows(ir)
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
    rows, tensors = _site_rows(ir)
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
    from adaptrix.runtime.bundle import load_bundle

    bundle = load_bundle(path)
    rows = []
    for entry in bundle.modules:
        keys = [entry.lora["down"], entry.lora["up"]] if entry.lora else []
        keys += [entry.dora["magnitude"]] if entry.dora else []
        keys += [entry.bias] if entry.bias else []
        keys += list(entry.replace.values())
        tensors = [bundle.tensors[key] for key in keys]
        ops = [kind for kind, there in (("lora", entry.lora and not entry.dora), ("dora", entry.dora),
               ("bias", entry.bias), ("replace", entry.replace)) if there]  # fmt: skip
        rows.append(
            {
                "module": entry.name,
                "layer": _layer_of(entry.name),
                "sites": list(entry.sites),
                "op": "+".join(ops),
                "rank": entry.lora["rank"] if entry.lora else None,
                "scale": entry.lora["scale"] if entry.lora else None,
                "parameters": sum(t.numel() for t in tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
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


def _is_bundle(path: Path) -> bool:
    manifest = path / "manifest.json"
    return manifest.is_file() and not (path / "adapter_config.json").is_file()


def _site_rows(ir: AdapterIR) -> tuple[list[dict], dict[int, LazyTensor]]:
    rows, unique = [], {}
    for site, op in sorted(ir, key=lambda pair: site_order(pair[0])):
        tensors = _op_tensors(op)
        unique.update((id(t), t) for t in tensors)
        low_rank = op.low_rank if isinstance(op, DoRA) else op
        rows.append(
            {
                "layer": site.layer,
                "role": str(site.role),
                "op": _KINDS[type(op)],
                "rank": low_rank.rank if isinstance(low_rank, LowRank) else None,
                "scale": low_rank.scale if isinstance(low_rank, LowRank) else None,
                "parameters": sum(t.numel for t in tensors),
                "bytes": sum(t.nbytes for t in tensors),
            }
        )
    return rows, unique


def _op_tensors(op: Op) -> list[LazyTensor]:
    if isinstance(op, LowRank):
        return [op.a, op.b]
    if isinstance(op, DoRA):
        return [op.low_rank.a, op.low_rank.b, op.magnitude]
    if isinstance(op, Bias):
        return [op.delta]
    return list(op.tensors.values())


def _module_rows(adapter: PeftAdapter) -> tuple[list[dict], dict[int, LazyTensor]]:
    rows, unique = [], {}
    settings = adapter.settings
    for record in adapter.modules.values():
        tensors = [
            t
            for t in (record.lora_a, record.lora_b, record.embedding_a, record.embedding_b,
                      record.magnitude, record.lora_b_bias, *record.params.values())
            if t is not None
        ]  # fmt: skip
        unique.update((id(t), t) for t in tensors)
        rows.append(
            {
                "module": record.name,
                "layer": _layer_of(record.name),
                "op": _module_kind(record),
                "rank": settings.rank(record.name) if record.has_lora else None,
                "scale": settings.scale(record.name) if record.has_lora else None,
                "parameters": sum(t.numel for t in tensors),
                "bytes": sum(t.nbytes for t in tensors),
            }
        )
    return rows, unique


def _module_kind(record) -> str:
    if record.has_lora:
        return "dora" if record.magnitude is not None else "lora"
    return "bias" if set(record.params) == {"bias"} else "replace"


def _layer_of(name: str) -> int | None:
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None
