"""`adaptrix inspect` for AdapterHub directories: LoRA ranks and bottleneck sizes per layer.

With a base, rows are the lowered IR's sites (a bottleneck's size, activation, placement and the
tensors it shares); without one, rows are the saved modules as the file names them.
"""

from __future__ import annotations

import re
from pathlib import Path

from adaptrix.api.inspect_rows import site_rows
from adaptrix.frontends.adapterhub.adapter import lower_adapterhub, read_adapterhub
from adaptrix.io.checkpoint import Checkpoint

__all__ = ["inspect_adapterhub"]

_GROUP = re.compile(r"(?P<module>.+?)\.(?:loras|adapters)\.[^.]+\.(?P<param>.+)")


def inspect_adapterhub(path: Path | str, base: Path | str | None = None) -> dict:
    """Describe an AdapterHub adapter: its methods, then per site (with a base) or per saved module."""
    adapter = read_adapterhub(path)
    config = adapter.config
    methods = [
        name
        for name, there in (
            ("lora", config.lora and not config.lora.is_ia3),
            ("ia3", config.lora and config.lora.is_ia3),
            ("bottleneck", config.bottleneck),
        )
        if there
    ]
    summary: dict = {
        "adapter": str(path),
        "format": "adapterhub",
        "name": config.name,
        "model_type": config.model_type,
        "methods": methods,
    }
    if config.bottleneck is not None:
        summary["bottleneck_config"] = dict(config.bottleneck.values)
    if config.lora is not None:
        summary["lora_config"] = dict(config.lora.values)
    unique = {id(t): t for t in adapter.tensors.values()}  # tensors shared across layers count once
    if base is None:
        rows = _saved_rows(adapter)
    else:
        ir = lower_adapterhub(adapter, Checkpoint(base))
        rows, _ = site_rows(ir)
        summary["base"] = str(base)
        summary["source"] = ir.source.as_dict()
    summary.update(
        layers=sorted({row["layer"] for row in rows if row["layer"] is not None}),
        shared_tensors=len(adapter.tensors) - len(unique),
        parameters=sum(t.numel for t in unique.values()),
        bytes=sum(t.nbytes for t in unique.values()),
        rows=rows,
    )
    return summary


def _saved_rows(adapter) -> list[dict]:
    groups: dict[str, dict] = {}
    for key, tensor in adapter.tensors.items():
        match = _GROUP.fullmatch(key)
        module = match.group("module") if match else key
        groups.setdefault(module, {})[match.group("param") if match else key] = tensor
    rows = []
    for module, params in groups.items():
        digits = [part for part in module.split(".") if part.isdigit()]
        lora = "lora_B" in params
        down = params.get("adapter_down.1.weight", params.get("adapter_down.0.weight"))
        rows.append(
            {
                "module": module,
                "layer": int(digits[0]) if digits else None,
                "op": ("ia3" if adapter.config.lora.is_ia3 else "lora") if lora else "bottleneck",
                "rank": params["lora_A"].shape[0] if "lora_A" in params and lora else None,
                "size": down.shape[0] if down is not None else None,
                "parameters": sum(t.numel for t in params.values()),
                "bytes": sum(t.nbytes for t in params.values()),
            }
        )
    return rows
