"""A GGUF LoRA adapter, as llama.cpp's convert_lora_to_gguf writes one, every scale folded in.

Per module: `NAME.lora_a` [r, in] and `NAME.lora_b` [out, r] under the base tensor's GGUF name, B
rewritten as the converter rewrites the weight's rows (llama's q / k permutation, GPT-NeoX's qkv
regrouping). adapter.lora.alpha is 0, which llama.cpp reads as "scale 1": the scale of each module
(alpha / r, rank_pattern, alpha_pattern, rsLoRA) is already in B.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.factored_low_rank import factored_as_low_rank
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.module_pairs import low_rank_pairs
from adaptrix.targets.gguf.families import GgufFamily
from adaptrix.targets.gguf.tensors import rewrite

__all__ = ["LoraTensor", "lora_tensors", "write_lora_gguf"]

logger = logging.getLogger(__name__)

LoraTensor = tuple[str, np.ndarray, np.ndarray]  # the base tensor's GGUF name, A [r, in], B [out, r]
_EXPERT = re.compile(r".+\.experts\.\d+\..+")


def lora_tensors(ir: AdapterIR, base: Checkpoint, family: GgufFamily) -> list[LoraTensor]:
    """Each touched module's A and B under its GGUF weight's name; a module without one is refused."""
    names = gguf.get_tensor_name_map(family.arch, base.source.num_layers)
    found = []
    for pair in low_rank_pairs(factored_as_low_rank(ir), base, torch.float32):
        weight = pair.weight
        name = names.get_name(family.map_key(weight), try_suffixes=(".weight",))
        missing = weight.endswith(family.dropped) or weight not in base.tensors or name is None
        if weight.endswith(family.no_lora):
            raise UnsupportedError(
                f"{pair.placement.name}: llama.cpp's {family.arch.name} graph applies no LoRA to this module",
                path=base.path,
                fix="compile without --unmerged (merged into the weights), or leave the module out",
            )  # fmt: skip
        if missing or _EXPERT.fullmatch(weight):
            raise UnsupportedError(
                f"{pair.placement.name}: the GGUF model has no tensor of its own for this module"
                + (" (GGUF stacks the experts)" if _EXPERT.fullmatch(weight) else ""),
                path=base.path,
                fix="compile without --unmerged (merged into the weights), or leave the module out",
            )  # fmt: skip
        down, up = pair.down.float(), pair.up.float()  # output += (x @ down) @ up
        b = up.T.contiguous()  # [out, r]: the pair is in x's terms, so Conv1D's transpose is not B's
        if not (family.transposed and weight.endswith(family.transposed)):
            b = rewrite(weight, b, family, base)  # the weight's row order (q / k permutation, qkv)
        found.append((name, np.ascontiguousarray(down.T.numpy()), np.ascontiguousarray(b.numpy())))
    return found


def write_lora_gguf(tensors: list[LoraTensor], family: GgufFamily, file: Path, name: str) -> dict:
    """Write one GGUF LoRA adapter file; return the manifest's record of it."""
    writer = gguf.GGUFWriter(file, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp applies B @ A as written
    writer.add_name(name)
    for tensor_name, a, b in tensors:
        writer.add_tensor(f"{tensor_name}.lora_a", a.astype(np.float32))
        writer.add_tensor(f"{tensor_name}.lora_b", b.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ranks = sorted({int(a.shape[0]) for _, a, _ in tensors})
    return {"modules": len(tensors), "ranks": ranks, "dtype": "f32"}
