"""What llama.cpp's converter (convert_hf_to_gguf) does per family, as small tables.

Each family names its GGUF architecture, the hyperparameters the converter writes from config.json,
and the few tensor rewrites it makes: llama's rotary permutation of q/k rows, Gemma's RMSNorm
weights stored as (1 + w), GPT-2's Conv1D weights transposed, GPT-NeoX's, Bloom's and Falcon's fused
qkv regrouped, DeepSeek's kv_b split, DBRX's fused experts stored 3-D. The refusals are in checks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from adaptrix.binders.splits import Split
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.gguf import checks as ck
from adaptrix.targets.gguf import hparams as hp
from adaptrix.targets.gguf import hparams_moe as moe
from adaptrix.targets.gguf import hparams_own as own
from adaptrix.targets.gguf.rope import check_rope

__all__ = ["FAMILIES", "GgufFamily", "family_of", "permute_rows"]


@dataclass(frozen=True, slots=True)
class GgufFamily:
    """One family's GGUF architecture, hyperparameters and tensor rewrites."""

    arch: gguf.MODEL_ARCH
    hparams: Callable[[hp.Writer, dict], None]
    permute_qk: bool = False  # llama's rotary layout: q / k rows regrouped per head (LlamaModel.permute)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w); llama.cpp by its stored weight: w + 1
    transposed: tuple[str, ...] = ()  # Conv1D weights stored [in, out]: name suffixes
    qkv: Split | None = None  # the fused qkv's layout (the binder's split): regrouped as [q | k | v]
    qkv_name: str = "query_key_value"  # the fused qkv module
    dropped: tuple[str, ...] = ()  # checkpoint tensors the converter leaves out: name suffixes
    from_tensors: Callable[[hp.Writer, Checkpoint], None] | None = None  # metadata read from tensors
    ssm: bool = False  # Mamba: A_log stored as A = -exp(A_log)
    squeeze: tuple[str, ...] = ()  # conv weights [channels, 1, kernel] stored as [channels, kernel]
    mla: bool = False  # DeepSeek's kv_b_proj split into k_b (transposed) and v_b per head
    no_lora: tuple[str, ...] = ()  # weights llama.cpp's graph multiplies without a GGUF LoRA: name suffixes
    fused_experts: tuple[str, ...] = ()  # DBRX's [experts * ff, embd] gate, up, down: 3-D, down transposed
    reshaped: tuple[str, ...] = ()  # Mamba 2's A, D (columns) and gated norm (per group): name suffixes
    renamed: tuple[tuple[str, str], ...] = ()  # the converter's renames before its tensor map
    gate_up: tuple[str, ...] = ()  # fused [experts,] gate | up tensors the converter splits (Granite MoE's)
    strip: str = ""  # a prefix the converter drops from checkpoint names before its tensor map (Bloom's)
    llama3_rope: bool = False  # llama3 rope scaling as rope_freqs: graphs of llama.cpp that read it
    check: Callable[[dict, Path], None] = field(default=lambda config, path: None)
    sentencepiece: str | None = None  # a tokenizer.model alone: "llama", "no-space-prefix" (Gemma 2 / 3)

    @staticmethod
    def expert_count(config: dict) -> int:
        """The number of experts of a fused-experts (DBRX) config."""
        return config["ffn_config"]["moe_num_experts"]

    def map_key(self, key: str) -> str:
        """The checkpoint name as the converter looks it up in llama.cpp's tensor map."""
        key = key.removeprefix(self.strip) if self.strip else key
        key = key + ".weight" if self.fused_experts and key.endswith(self.fused_experts) else key
        for old, new in self.renamed:
            key = key.replace(old, new)
        return key.replace("e_score_correction_bias", "e_score_correction.bias")  # filter_tensors' rename


_GATE_UP = ("block_sparse_moe.input_linear.weight",)  # Granite MoE's experts: [experts, gate | up, in]
_XIELU = tuple(f".act_fn.{key}" for key in ("alpha_n", "alpha_p", "beta", "eps"))  # Apertus' activation
# llama.cpp's deepseek2 graph multiplies these with ggml_mul_mat, not build_lora_mm (kv_b: split in the GGUF)
_MLA_NO_LORA = tuple(f"{name}.weight" for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"))
_DBRX_EXPERTS = ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2")  # gate, up, down
_HEADWISE = Split("headwise", ("q", "k", "v"))  # per head q, k, v (GPT-NeoX, Bloom)
_GROUPED = Split("grouped", ("q", "k", "v"))  # per kv head its query heads, key, value (Falcon, GPTBigCode)
_GEMMA_DROPPED = _TIED_HEAD = ("lm_head.weight",)  # llama.cpp ties the head: the converter skips it

FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily(
        gguf.MODEL_ARCH.LLAMA, hp.llama, permute_qk=True, llama3_rope=True, sentencepiece="llama"
    ),
    "mistral": GgufFamily(
        gguf.MODEL_ARCH.LLAMA, hp.llama, permute_qk=True, llama3_rope=True, sentencepiece="llama"
    ),
    "mixtral": GgufFamily(
        gguf.MODEL_ARCH.LLAMA, hp.llama, permute_qk=True, llama3_rope=True, sentencepiece="llama"
    ),
    "granite": GgufFamily(gguf.MODEL_ARCH.GRANITE, hp.granite, permute_qk=True, llama3_rope=True),
    "granitemoe": GgufFamily(
        gguf.MODEL_ARCH.GRANITE_MOE, hp.granite, permute_qk=True, llama3_rope=True, gate_up=_GATE_UP
    ),
    "granitemoeshared": GgufFamily(  # its shared MLP's fused input_linear split likewise
        gguf.MODEL_ARCH.GRANITE_MOE,
        moe.granitemoeshared,
        permute_qk=True,
        llama3_rope=True,
        gate_up=(*_GATE_UP, "shared_mlp.input_linear.weight"),
    ),
    "olmo": GgufFamily(gguf.MODEL_ARCH.OLMO, hp.olmo, permute_qk=True),
    "olmo2": GgufFamily(gguf.MODEL_ARCH.OLMO2, hp.olmo2, check=ck.own_head),
    "olmo3": GgufFamily(gguf.MODEL_ARCH.OLMO2, hp.olmo2, check=ck.own_head),
    "stablelm": GgufFamily(
        gguf.MODEL_ARCH.STABLELM, own.stablelm, check=ck.both(ck.qk_layernorm, ck.own_head)
    ),
    "starcoder2": GgufFamily(gguf.MODEL_ARCH.STARCODER2, hp.text),
    "phi": GgufFamily(gguf.MODEL_ARCH.PHI2, own.phi2, check=ck.both(ck.qk_layernorm, ck.own_head)),
    "falcon": GgufFamily(gguf.MODEL_ARCH.FALCON, own.falcon, qkv=_GROUPED, check=ck.falcon),
    "bloom": GgufFamily(gguf.MODEL_ARCH.BLOOM, own.bloom, qkv=_HEADWISE, strip="transformer."),
    "gpt_bigcode": GgufFamily(gguf.MODEL_ARCH.STARCODER, own.gpt_bigcode, qkv=_GROUPED, qkv_name="c_attn"),
    "mpt": GgufFamily(gguf.MODEL_ARCH.MPT, own.mpt),
    "arcee": GgufFamily(gguf.MODEL_ARCH.ARCEE, hp.llama, permute_qk=True, llama3_rope=True),
    "apertus": GgufFamily(  # xIELU's parameters as metadata; q / k rows as stored (undo_permute False)
        gguf.MODEL_ARCH.APERTUS, hp.llama, llama3_rope=True, dropped=_XIELU, from_tensors=own.xielu
    ),
    "seed_oss": GgufFamily(gguf.MODEL_ARCH.SEED_OSS, hp.text),
    "exaone4": GgufFamily(gguf.MODEL_ARCH.EXAONE4, hp.exaone4, llama3_rope=True, check=ck.exaone4),
    "cohere": GgufFamily(gguf.MODEL_ARCH.COMMAND_R, hp.cohere, dropped=_TIED_HEAD, check=ck.cohere),
    "cohere2": GgufFamily(gguf.MODEL_ARCH.COHERE2, hp.cohere2, dropped=_TIED_HEAD, check=ck.tied),
    "glm4": GgufFamily(gguf.MODEL_ARCH.GLM4, hp.glm4),
    "ernie4_5": GgufFamily(gguf.MODEL_ARCH.ERNIE4_5, hp.text, check=ck.ernie_bias),
    "ernie4_5_moe": GgufFamily(gguf.MODEL_ARCH.ERNIE4_5_MOE, moe.ernie4_5_moe, check=ck.ernie4_5_moe),
    "dots1": GgufFamily(gguf.MODEL_ARCH.DOTS1, moe.dots1, check=ck.dots1),
    "glm4_moe": GgufFamily(gguf.MODEL_ARCH.GLM4_MOE, moe.glm4_moe),
    "nemotron": GgufFamily(gguf.MODEL_ARCH.NEMOTRON, hp.nemotron, norm_plus_one=True),  # layernorm1p: w + 1
    "olmoe": GgufFamily(gguf.MODEL_ARCH.OLMOE, hp.text, check=ck.both(ck.router_norm(False), ck.olmoe)),
    "hunyuan_v1_dense": GgufFamily(gguf.MODEL_ARCH.HUNYUAN_DENSE, hp.text, check=ck.hunyuan),
    "hunyuan_v1_moe": GgufFamily(gguf.MODEL_ARCH.HUNYUAN_MOE, moe.hunyuan_moe, check=ck.hunyuan),
    "deepseek_v2": GgufFamily(
        gguf.MODEL_ARCH.DEEPSEEK2, moe.deepseek2, mla=True, no_lora=_MLA_NO_LORA, check=ck.deepseek
    ),
    "deepseek_v3": GgufFamily(
        gguf.MODEL_ARCH.DEEPSEEK2, moe.deepseek2, mla=True, no_lora=_MLA_NO_LORA, check=ck.deepseek
    ),
    "dbrx": GgufFamily(gguf.MODEL_ARCH.DBRX, moe.dbrx, fused_experts=_DBRX_EXPERTS, check=ck.dbrx),
    "jamba": GgufFamily(gguf.MODEL_ARCH.JAMBA, own.jamba, ssm=True, squeeze=("mamba.conv1d.weight",)),
    "glm": GgufFamily(gguf.MODEL_ARCH.CHATGLM, hp.glm),
    "mamba": GgufFamily(
        gguf.MODEL_ARCH.MAMBA, own.mamba, ssm=True, squeeze=("mixer.conv1d.weight",), check=ck.mamba
    ),
    "falcon_mamba": GgufFamily(
        gguf.MODEL_ARCH.MAMBA, own.mamba, ssm=True, squeeze=("mixer.conv1d.weight",), check=ck.falcon_mamba
    ),
    "mamba2": GgufFamily(
        gguf.MODEL_ARCH.MAMBA2,
        own.mamba2,
        ssm=True,
        squeeze=("mixer.conv1d.weight",),
        check=ck.mamba2,
        reshaped=("mixer.A_log", "mixer.D", "mixer.norm.weight"),
        renamed=((".dt_bias", ".dt_proj.bias"),),
    ),
    "lfm2": GgufFamily(gguf.MODEL_ARCH.LFM2, hp.lfm2, squeeze=("conv.conv.weight",)),
    "smollm3": GgufFamily(gguf.MODEL_ARCH.SMOLLM3, hp.llama, permute_qk=True, check=ck.smollm3_layers),
    "qwen2": GgufFamily(gguf.MODEL_ARCH.QWEN2, hp.text),
    "qwen3": GgufFamily(gguf.MODEL_ARCH.QWEN3, hp.text),
    "qwen2_moe": GgufFamily(gguf.MODEL_ARCH.QWEN2MOE, moe.qwen_moe, check=ck.router_norm(False)),
    "qwen3_moe": GgufFamily(gguf.MODEL_ARCH.QWEN3MOE, moe.qwen_moe, check=ck.router_norm(True)),
    "gpt2": GgufFamily(
        gguf.MODEL_ARCH.GPT2, own.gpt2, transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    ),
    "gpt_neox": GgufFamily(gguf.MODEL_ARCH.GPTNEOX, own.gpt_neox, qkv=_HEADWISE),
    "phi3": GgufFamily(gguf.MODEL_ARCH.PHI3, hp.phi3),
    "gemma": GgufFamily(gguf.MODEL_ARCH.GEMMA, hp.gemma, norm_plus_one=True, dropped=_GEMMA_DROPPED),
    "gemma2": GgufFamily(
        gguf.MODEL_ARCH.GEMMA2,
        hp.gemma2,
        norm_plus_one=True,
        dropped=_GEMMA_DROPPED,
        check=ck.query_scale,
        sentencepiece="no-space-prefix",
    ),
    "gemma3_text": GgufFamily(
        gguf.MODEL_ARCH.GEMMA3,
        hp.gemma3,
        norm_plus_one=True,
        check=ck.query_scale,
        sentencepiece="no-space-prefix",
    ),
}


def family_of(config: dict, path: Path) -> GgufFamily:
    """The GGUF table of a base's family, or a one-line refusal naming the family."""
    model_type = str(config["model_type"])
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedError(
            f"the gguf target does not support the {model_type!r} family (it does {', '.join(FAMILIES)})",
            path=path / "config.json",
            fix="use --target merged, then llama.cpp's convert_hf_to_gguf.py if it supports the family",
        )
    family.check(config, path)
    check_rope(config, path, llama3=family.llama3_rope, longrope=family.arch is gguf.MODEL_ARCH.PHI3)
    return family


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Llama's q / k rows regrouped per head for llama.cpp's rotary layout (LlamaModel.permute)."""
    grouped = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)
