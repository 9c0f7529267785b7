"""The GGUF tensors of a merged model: names from llama.cpp's tensor map, types, values streamed one by one.

Each GGUF tensor comes from one planned output tensor of the merge (or, for MoE experts, one per
expert, stacked), merged in float32, rewritten as the converter rewrites it (families.py) and
rounded once to its GGML type with llama.cpp's own quantizer (quantize.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from adaptrix.binders.splits import split_rows
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.lowering.tensor_plan import TensorPlan, merged_value
from adaptrix.targets.gguf.families import GgufFamily, permute_rows
from adaptrix.targets.gguf.quantize import map_ordered, quantize_rows

__all__ = ["CHUNK_BYTES", "QTYPES", "GgufTensor", "gguf_tensors", "round_rows", "source_value"]

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
QTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
          "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}  # fmt: skip
CHUNK_BYTES = 4 << 20  # float32 bytes of rows rounded at a time, a few blocks at once on threads
# Buffers transformers may save that the converter never writes (its prepare_tensors skips them)
_NOT_WEIGHTS = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq", ".attn.bias",
                ".attn.masked_bias")  # fmt: skip
_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(.+)")
_KV_B = "kv_b_proj.weight"  # DeepSeek's MLA: split into k_b and v_b
_A_LOG = ".A_log"  # Mamba's and Jamba's: stored as A = -exp(A_log)
# Kept in float32 whatever the file type, as the converter and llama-quantize keep them
_F32_KINDS = frozenset({gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
                        gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES,
                        gguf.MODEL_TENSOR.SSM_CONV1D, gguf.MODEL_TENSOR.SHORTCONV_CONV})  # fmt: skip


@dataclass(frozen=True, slots=True)
class GgufTensor:
    """One GGUF tensor: its name, the merged tensors it is made of, its shape (numpy order) and type."""

    name: str
    key: str  # the checkpoint name it maps from (experts: the stacked name, without the index)
    items: tuple[TensorPlan, ...]
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    half: int | None = None  # of a fused [experts, gate | up, in] tensor, the gate (0) or up (1) rows

    @property
    def nbytes(self) -> int:
        """Its size in the file."""
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def gguf_tensors(
    items: list[TensorPlan], base: Checkpoint, family: GgufFamily, qtype: Q, untied: bool
) -> tuple[list[GgufTensor], list[str]]:
    """The GGUF tensors of the planned merge, and those kept in float16 (rows the blocks do not divide)."""
    if untied and "lm_head.weight" in family.dropped:
        raise UnsupportedError(
            "the adapter unties the head from the embedding, and llama.cpp ties this family's head",
            path=base.path, fix="leave embed_tokens / lm_head out of the adapter, or use --target merged",
        )  # fmt: skip
    groups: dict[str, list[tuple[int, TensorPlan]]] = {}
    for item in items:
        if item.name.endswith((*_NOT_WEIGHTS, *family.dropped)):
            if item.touched:
                raise UnsupportedError(
                    f"{item.name}: the adapter changes a tensor that llama.cpp's GGUF leaves out",
                    path=base.path, fix="leave that module out of the adapter, or use --target merged",
                )  # fmt: skip
            continue
        expert = _EXPERT.fullmatch(item.name)
        key = f"{expert[1]}.{expert[3]}" if expert else item.name
        groups.setdefault(key, []).append((int(expert[2]) if expert else 0, item))
    names = gguf.get_tensor_name_map(family.arch, base.source.num_layers)
    tensors, kept = [], []
    for key, group in groups.items():
        if family.gate_up and key.endswith(family.gate_up):  # split in two, as the converter does
            tensors.extend(_halves(key, tuple(item for _, item in group), base, qtype))
            continue
        if family.mla and key.endswith(_KV_B):
            tensors.extend(_kv_b(key, group[0][1], base, qtype))
            continue
        found = names.get_type_and_name(family.map_key(key), try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UnsupportedError(f"{key}: llama.cpp's tensor map has no {family.arch.name} tensor for it",
                                   path=base.path, fix="use --target merged")  # fmt: skip
        kind, name = found
        group.sort(key=lambda pair: pair[0])
        if [index for index, _ in group] != list(range(len(group))):
            raise UnsupportedError(f"{key}: the experts are not numbered 0..{len(group) - 1}", path=base.path,
                                   fix="re-save the base with save_pretrained")  # fmt: skip
        shape = tuple(base.tensors[group[0][1].source].shape) if group[0][1].source else ()
        shape = shape[::-1] if key.endswith(family.transposed) and family.transposed else shape
        shape = (
            tuple(n for n in shape if n != 1) if family.squeeze and key.endswith(family.squeeze) else shape
        )
        shape = (len(group), *shape) if len(group) > 1 or _EXPERT.fullmatch(group[0][1].name) else shape
        shape = (
            _reshaped(key, shape, base.config) if family.reshaped and key.endswith(family.reshaped) else shape
        )
        if family.fused_experts and key.endswith(family.fused_experts):  # DBRX's [experts * ff, embd]
            experts = family.expert_count(base.config)
            shape = (experts, shape[0] // experts, shape[1])
            shape = (experts, shape[2], shape[1]) if key.endswith(family.fused_experts[-1]) else shape
        chosen = _qtype(kind, name, shape, qtype)
        if chosen is not qtype and chosen is Q.F16:
            kept.append(name)
        tensors.append(GgufTensor(name, key, tuple(item for _, item in group), shape, chosen))
    return tensors, kept


def _halves(key: str, items: tuple[TensorPlan, ...], base: Checkpoint, qtype: Q) -> list[GgufTensor]:
    """A fused [experts, gate | up, in] (or shared [gate | up, in]) tensor as the converter splits it."""
    *lead, rows, columns = base.tensors[items[0].source].shape
    layer = int(re.search(r"\.(\d+)\.", key)[1])
    shared = (gguf.MODEL_TENSOR.FFN_GATE_SHEXP, gguf.MODEL_TENSOR.FFN_UP_SHEXP)
    kinds = shared if not lead else (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)
    shape = (*lead, rows // 2, columns)
    names = [gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight" for kind in kinds]
    return [GgufTensor(name, key, items, shape, _qtype(kind, name, shape, qtype), half)
            for half, (kind, name) in enumerate(zip(kinds, names, strict=True))]  # fmt: skip


def _kv_b(key: str, item: TensorPlan, base: Checkpoint, qtype: Q) -> list[GgufTensor]:
    """DeepSeek's kv_b_proj as the converter writes it for MLA: k_b [heads, rank, nope] and v_b."""
    config, layer = base.config, int(re.search(r"\.(\d+)\.", key)[1])
    n_head, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    rank = base.tensors[item.source].shape[-1]
    shapes = {gguf.MODEL_TENSOR.ATTN_K_B: (n_head, rank, nope),
              gguf.MODEL_TENSOR.ATTN_V_B: (n_head, config["v_head_dim"], rank)}  # fmt: skip
    tensors = []
    for half, (kind, shape) in enumerate(shapes.items()):
        name = gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"
        tensors.append(GgufTensor(name, key, (item,), shape, _qtype(kind, name, shape, qtype), half))
    return tensors


def _reshaped(key: str, shape: tuple[int, ...], config: dict) -> tuple[int, ...]:
    """Mamba 2's vectors as the converter reshapes them: the gated norm per group, A and D as columns."""
    if key.endswith("norm.weight"):
        groups = config.get("n_groups") or 1
        return (groups, shape[0] // groups)
    return (*shape, 1)


def _qtype(kind: gguf.MODEL_TENSOR, name: str, shape: tuple[int, ...], qtype) -> gguf.GGMLQuantizationType:
    """The converter's choice: norms, biases, vectors and routers in float32; the rest in `qtype`."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or kind in _F32_KINDS:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        logger.warning("%s: rows of %d do not split into %s blocks of %d: kept in float16 (as llama.cpp's "
                       "converter keeps it)", name, shape[-1], qtype.name, block)  # fmt: skip
        return Q.F16
    return qtype


def round_rows(value: torch.Tensor, qtype: Q, chunk_bytes: int | None = None) -> Iterator[np.ndarray]:
    """`value` rounded to `qtype` in blocks of rows, each widened to float32 only when its turn comes."""
    rows = value.reshape(-1, value.shape[-1]) if value.dim() > 1 else value.reshape(1, -1)
    step = max(1, (chunk_bytes or CHUNK_BYTES) // (4 * max(1, rows.shape[1])))
    blocks = (rows[start : start + step] for start in range(0, rows.shape[0], step))
    yield from map_ordered(lambda block: quantize_rows(block.to(torch.float32).numpy(), qtype), blocks)


def source_value(
    tensor: GgufTensor, base: Checkpoint, family: GgufFamily, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensor before rounding: as stored (untouched, not rewritten), else merged in float32, rewritten.

    A float32 `buffer` at least the tensor's size is merged into where the merge allows (one stored
    tensor, not rewritten), instead of a new allocation: its pages are reused from tensor to tensor.
    """
    if tensor.half is not None:  # the whole fused tensor, then its half
        shape = tuple(base.tensors[tensor.items[0].source].shape)
        whole = source_value(dataclasses.replace(tensor, half=None, shape=shape), base, family)
        if family.mla and tensor.key.endswith(_KV_B):  # per head [nope | v] rows: k_b transposed, v_b
            config = base.config
            nope = config["qk_nope_head_dim"]
            heads = whole.reshape(config["num_attention_heads"], nope + config["v_head_dim"], shape[-1])
            return (
                heads[:, :nope].transpose(1, 2).contiguous()
                if tensor.half == 0
                else heads[:, nope:].contiguous()
            )
        rows = whole.shape[-2] // 2
        return whole.narrow(-2, tensor.half * rows, rows).contiguous()
    item = tensor.items[0]
    stored = item.source is not None and len(tensor.shape) == len(base.tensors[item.source].shape)
    if len(tensor.items) == 1 and stored and not item.touched and not _rewritten(tensor.key, family):
        return base.read(item.source)
    if len(tensor.items) == 1 and stored and buffer is not None and not _rewritten(tensor.key, family):
        size = math.prod(tensor.shape)
        if buffer.numel() >= size:
            out = buffer[:size].view(base.tensors[item.source].shape)
            return merged_value(item, base, torch.float32, out=out)
    parts = [merged_value(item, base, torch.float32) for item in tensor.items]
    value = torch.stack(parts) if len(parts) > 1 or _EXPERT.fullmatch(tensor.items[0].name) else parts[0]
    return rewrite(tensor.key, value, family, base)


def _rewritten(key: str, family: GgufFamily) -> bool:
    """Whether the converter rewrites this tensor (rewrite() changes it)."""
    return bool(
        (family.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")))
        or (family.norm_plus_one and key.endswith("norm.weight"))
        or (family.transposed and key.endswith(family.transposed))
        or (family.ssm and key.endswith(_A_LOG))
        or bool(family.fused_experts and key.endswith(family.fused_experts))
        or bool(family.reshaped and key.endswith(family.reshaped))
        or (family.squeeze and key.endswith(family.squeeze))
        or (family.qkv is not None and key.endswith((f"{family.qkv_name}.weight", f"{family.qkv_name}.bias")))
    )


def rewrite(key: str, value: torch.Tensor, family: GgufFamily, base: Checkpoint) -> torch.Tensor:
    """The converter's per-family rewrite of one tensor (its rows' order, Gemma's +1, GPT-2's transpose)."""
    config = base.config
    n_head = config.get("num_attention_heads") or config.get("n_head")
    if family.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
        value = permute_rows(value, n_head)
    elif family.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
        value = permute_rows(value, config.get("num_key_value_heads") or n_head)
    if family.norm_plus_one and key.endswith("norm.weight"):
        value = value + 1
    if family.transposed and key.endswith(family.transposed):
        value = value.T.contiguous()
    if family.ssm and key.endswith(_A_LOG):
        value = -torch.exp(value)
    if family.reshaped and key.endswith(family.reshaped):
        value = value.reshape(_reshaped(key, tuple(value.shape), config))
    if family.fused_experts and key.endswith(family.fused_experts):  # per expert [ff, embd]; down: [embd, ff]
        value = value.reshape(family.expert_count(config), -1, value.shape[-1])
        value = value.transpose(1, 2).contiguous() if key.endswith(family.fused_experts[-1]) else value
    if family.squeeze and key.endswith(family.squeeze):
        value = value.squeeze(1)  # conv weights [channels, 1, kernel] -> [channels, kernel]
    if family.qkv is not None and key.endswith((f"{family.qkv_name}.weight", f"{family.qkv_name}.bias")):
        value = torch.cat([value[rows] for rows in split_rows(family.qkv, base.source)])  # -> [q | k | v]
    return value
