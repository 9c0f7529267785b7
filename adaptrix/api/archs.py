"""What each model family compiles to, from the registries: binder tables, the module tree, the exporter.

A family with a role table (adaptrix/binders/) has semantic roles: passes that need them
(project, fuse-hybrid) and AIR work on it. Every other family transformers can build compiles
to merged, hooks and `--to peft` through its module tree. The onnx column names the exporter
that writes the family's graph here (optimum, onnxruntime-genai's builder or torch.onnx).
"""

from __future__ import annotations

import logging
from functools import cache

__all__ = ["FAMILY_COLUMNS", "families", "families_markdown"]

logger = logging.getLogger(__name__)

FAMILY_COLUMNS = ("family", "binder", "merged", "hooks", "onnx", "roles")
_KINDS = ("causal-lm", "seq2seq-lm", "masked-lm")


def families(everything: bool = False) -> list[dict[str, str]]:
    """One row per family: its binder (table or module tree) and what it compiles to.

    Without `everything`, the families with a role table; with it, also every text family of
    transformers' causal-LM, seq2seq-LM and masked-LM mappings.
    """
    from adaptrix.binders import BINDERS

    kinds = _text_families()
    names = set(BINDERS) | (set(kinds) if everything else set())
    rows = []
    for model_type in sorted(names):
        table = BINDERS.get(model_type)
        binder = f"{table.name} table" if table else "module tree"
        if table and any(m.split for m in (*table.layer_modules.values(), *table.model_modules.values())):
            binder += " (fused splits)"
        rows.append({
            "family": model_type,
            "binder": binder,
            "merged": "yes",
            "hooks": "yes",
            "onnx": _onnx(model_type),
            "roles": "yes" if table else "no",
        })  # fmt: skip
    return rows


def families_markdown(everything: bool = False) -> str:
    """The families as a markdown table (docs/support.md holds it)."""
    rows = families(everything)
    lines = ["| " + " | ".join(FAMILY_COLUMNS) + " |", "|" + "---|" * len(FAMILY_COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in FAMILY_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@cache
def _text_families() -> dict[str, str]:
    """model_type -> the first auto mapping that has it (causal LM, seq2seq LM, masked LM)."""
    from transformers.models.auto import modeling_auto as auto

    found: dict[str, str] = {}
    mappings = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)  # fmt: skip
    for kind, mapping in zip(_KINDS, mappings, strict=True):
        for model_type in mapping:
            found.setdefault(model_type, kind)
    return found


def _onnx(model_type: str) -> str:
    """The exporter that writes the family's ONNX graph here, or what to install (targets/onnx/exporters.py).

    `optimum` where optimum's exporter has a config for the family, else for a causal LM the
    builder lists `genai-builder` (transformers 5), else `torch.onnx`; an encoder-decoder
    needs optimum.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from adaptrix.targets.onnx import exporters
    from adaptrix.targets.onnx.tasks import exported_tasks

    if exporters.has_optimum():
        if exported_tasks(model_type) is not None:
            return exporters.OPTIMUM
    else:
        logger.info("optimum's ONNX exporter is not installed")
    kind = _text_families().get(model_type)
    if kind == "seq2seq-lm":
        return "no" if exporters.has_optimum() else "needs optimum-onnx"
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if kind == "causal-lm" and exporters.has_builder() and causal in exporters.BUILDER_ARCHITECTURES:
        return exporters.BUILDER
    return exporters.TORCH
