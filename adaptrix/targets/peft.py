"""The PEFT writer: an IR as a PEFT LoRA adapter directory for the base's architecture.

What the adapter holds is computed in adaptrix.lowering.peft_state (names, exact scales, fused
modules); this target writes it as adapter_config.json and adapter_model.safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptrix.artifacts import PEFT_CONFIG_NAME as CONFIG_FILE
from adaptrix.artifacts import PEFT_WEIGHTS_NAME as WEIGHTS_FILE
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.peft_state import peft_state
from adaptrix.targets.written import Written

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "write_peft"]


def write_peft(
    ir: AdapterIR,
    base: Checkpoint,
    out: Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Written:
    """Write adapter_config.json and adapter_model.safetensors into directory `out`."""
    dtype = dtype or torch.float32
    state = peft_state(ir, base)
    save_file({k: v.to(dtype).contiguous() for k, v in state.tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps(state.config, indent=2, sort_keys=True) + "\n")
    return Written(
        [CONFIG_FILE, WEIGHTS_FILE], {"peft": {"r": state.config["r"], "modules": len(state.deltas)}}
    )
