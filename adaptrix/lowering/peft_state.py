"""A PEFT LoRA adapter computed from the IR, in memory: its config and its state dict.

Module names come from the base's checkpoint through its binder. Each module's scale is kept
exactly: as lora_alpha / r (patterns per module) when that division gives the scale back bit for
bit, else folded into B with lora_alpha = r. PEFT's use_rslora is never needed. LoHa and LoKr
ops become LoRA, their exact low-rank forms. The peft target writes this state to files; the
distill pass loads it into PEFT's own trainable modules.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from adaptrix.binders.table import Layout
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.bottleneck import refuse_bottlenecks
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.factored_low_rank import factored_as_low_rank
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.peft_modules import LoraPair, ModuleDelta, module_deltas

__all__ = ["PEFT_PREFIX", "PeftState", "peft_state"]

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, slots=True)
class PeftState:
    """adapter_config.json's contents, the adapter's tensors by PEFT's names, and each module's delta."""

    config: dict
    tensors: dict[str, torch.Tensor]
    deltas: list[ModuleDelta]


def peft_state(ir: AdapterIR, base: Checkpoint) -> PeftState:
    """The PEFT LoRA adapter computing the IR's ops on `base`; an error names what PEFT cannot hold."""
    refuse_bottlenecks(ir, "a PEFT adapter cannot hold AdapterHub bottlenecks",
                       fix="use --target hooks, or keep the AdapterHub adapter")  # fmt: skip
    _refuse_packed(ir, base)
    deltas = module_deltas(factored_as_low_rank(ir), base)  # LoHa / LoKr: their exact LoRA forms
    lora = [d for d in deltas if d.lora is not None]
    if not lora:
        raise UnsupportedError("has no low-rank op: a PEFT LoRA adapter needs at least one target module",
                               fix="convert to --to air instead")  # fmt: skip
    if any(d.lora.magnitude is not None for d in lora) and any(d.lora.magnitude is None for d in lora):
        raise UnsupportedError(
            "has DoRA on some modules and plain LoRA on others: PEFT's use_dora is for all or none",
            fix="convert to --to air, or compile with --target merged",
        )
    ranks = {d.name: _exact_alpha(d.lora) for d in lora}
    tensors: dict[str, torch.Tensor] = {}
    for delta in deltas:
        tensors.update(_module_tensors(delta, ranks.get(delta.name)))
    config = _config(deltas, {name: (r, alpha) for name, (r, alpha, _) in ranks.items()}, base)
    return PeftState(config, tensors, deltas)


def _refuse_packed(ir: AdapterIR, base: Checkpoint) -> None:
    """A PEFT adapter names modules; transformers 5 packs MoE experts and routers into parameters."""
    for site, _ in ir:
        module = base.binder.layer_modules.get(site.role) if site.layer is not None else None
        if module is not None and module.packed is not None:
            raise UnsupportedError(
                f"has deltas on {site.role}, which this transformers packs into "
                f"{module.packed.module}.{module.packed.param}: a PEFT adapter of per-expert modules "
                "would not load onto it",
                fix="compile with --target merged or hooks (or convert with transformers 4.57)",
            )


def _exact_alpha(pair: LoraPair) -> tuple[int, float, torch.Tensor]:
    """(r, lora_alpha, B): alpha / r is the scale exactly, or the scale is folded into B."""
    rank = pair.a.shape[0]
    alpha = pair.scale * rank
    if alpha / rank == pair.scale:
        return rank, alpha, pair.b
    return rank, float(rank), pair.b * pair.scale


def _module_tensors(delta: ModuleDelta, rank: tuple[int, float, torch.Tensor] | None) -> dict:
    prefix = PEFT_PREFIX + delta.name
    tensors = {}
    if delta.lora is not None:
        a, b = delta.lora.a, rank[2]
        if delta.placement.module.layout is Layout.EMBEDDING:  # PEFT: A [r, num], B [dim, r]
            tensors[f"{prefix}.lora_embedding_A"] = b.T
            tensors[f"{prefix}.lora_embedding_B"] = a.T
        else:
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
        if delta.lora.magnitude is not None:
            tensors[f"{prefix}.lora_magnitude_vector"] = delta.lora.magnitude
    owner = f"{prefix}.base_layer" if delta.lora is not None else prefix
    tensors.update({f"{owner}.{param}": value for param, value in delta.params.items()})
    return tensors


def _config(deltas: list[ModuleDelta], ranks: dict[str, tuple[int, float]], base: Checkpoint) -> dict:
    (r, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    saved = [d.name for d in deltas if d.replaced and d.lora is None]
    biased = any("bias" in d.params for d in deltas if not (d.replaced and d.lora is None))
    layouts = {d.placement.module.layout for d in deltas if d.lora is not None}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base.path),
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "rank_pattern": {re.escape(name): nr for name, (nr, _) in ranks.items() if nr != r},
        "alpha_pattern": {re.escape(name): na for name, (_, na) in ranks.items() if na != alpha},
        "target_modules": _target_modules(list(ranks), base),
        "modules_to_save": saved or None,
        "bias": "all" if biased else "none",
        "use_dora": any(d.lora.magnitude is not None for d in deltas if d.lora is not None),
        "fan_in_fan_out": Layout.CONV1D in layouts,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_modules(names: list[str], base: Checkpoint) -> list[str]:
    """Full module names, or a layer module's key where it picks exactly the modules wanted.

    PEFT targets a module whose name equals an entry or ends with `.` + an entry.
    """
    modules = {t.rpartition(".")[0] for t in base.tensors} | set(names)
    by_key: dict[str, set[str]] = {}
    for name in names:
        placement = base.binder.resolve(name)
        if placement.layer is not None:
            by_key.setdefault(placement.key, set()).add(name)
    chosen = set(names)
    for key, group in by_key.items():
        if {m for m in modules if m == key or m.endswith("." + key)} == group:
            chosen = (chosen - group) | {key}
    return sorted(chosen)
