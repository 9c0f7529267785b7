"""An IR's LoRA as PEFT's own trainable modules on a base, and the trained factors back as IR ops.

In memory, no files: the adapter PEFT would load from the peft target's output is built from
adaptrix.lowering.peft_state and loaded with PEFT's own functions, so training goes through
PEFT's LoRA layers exactly as a PEFT user's would. A fused module (GPT-2's c_attn, Phi-3's
qkv_proj, GPT-NeoX's query_key_value) is one PEFT pair; read back, each of its roles gets the
pair's A and its own rows of B.
"""

from __future__ import annotations

import torch

from adaptrix.artifacts import find_module
from adaptrix.binders.table import Layout, split_rows
from adaptrix.calibration.models import load_auto
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR, LazyTensor, LowRank, Op, Site
from adaptrix.lowering.peft_state import PeftState, peft_state

__all__ = ["peft_student", "trained_ops"]

_ADAPTER = "default"


def peft_student(ir: AdapterIR, base: Checkpoint) -> tuple[torch.nn.Module, PeftState]:
    """The base with the IR's LoRA as PEFT's trainable LoRA modules (eval mode: dropout off)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    state = peft_state(ir, base)
    fields = {k: v for k, v in state.config.items() if k not in ("peft_type", "task_type")}
    config = LoraConfig(**{**fields, "inference_mode": False})
    with torch.inference_mode(False):
        model = get_peft_model(load_auto(base.path), config, adapter_name=_ADAPTER)
        result = set_peft_model_state_dict(model, state.tensors, adapter_name=_ADAPTER)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise UnsupportedError(f"PEFT did not take the adapter's tensors {unexpected[:3]}")
    return model.eval(), state


def trained_ops(model: torch.nn.Module, state: PeftState, base: Checkpoint) -> list[tuple[Site, Op]]:
    """Each module's trained LoRA pair as LowRank ops at its roles (fused modules: B's rows per role)."""
    inner = model.base_model.model
    ops: list[tuple[Site, Op]] = []
    for delta in state.deltas:
        if delta.lora is None:
            continue
        module = find_module(inner, delta.name)
        a, b = _factors(module, delta.placement.module.layout)
        scale = float(module.scaling[_ADAPTER])
        rows = split_rows(delta.placement.module.split, base.source)
        for i, role in enumerate(delta.placement.module.roles):
            site = Site(delta.placement.layer, role)
            b_rows = b if rows is None else b[rows[i]]
            down = LazyTensor.of(a.clone(), f"distilled {site} A")
            up = LazyTensor.of(b_rows.clone(), f"distilled {site} B")
            ops.append((site, LowRank(down, up, scale)))
    return ops


def _factors(module: torch.nn.Module, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] of a PEFT LoRA layer, canonical whatever the module's layout."""
    with torch.no_grad():
        if layout is Layout.EMBEDDING:  # PEFT: lora_embedding_A [r, num], lora_embedding_B [dim, r]
            return (module.lora_embedding_B[_ADAPTER].detach().T.float(),
                    module.lora_embedding_A[_ADAPTER].detach().T.float())  # fmt: skip
        return module.lora_A[_ADAPTER].weight.detach().float(), module.lora_B[
            _ADAPTER
        ].weight.detach().float()
