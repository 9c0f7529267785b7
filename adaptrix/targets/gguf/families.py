"""What llama.cpp's converter (convert_hf_to_gguf) does per family, as small tables.

Each family names its GGUF architecture, the hyperparameters the converter writes from config.json,
and the few tensor rewrites it makes: llama's rotary permutation of q/k rows, Gemma's RMSNorm
weights stored as (1 + w), GPT-2's Conv1D weights transposed, GPT-NeoX's, Bloom's and Falcon's fused
qkv regrouped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from adaptrix.binders.splits import Split
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.gguf import hparams as hp
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
    dropped: tuple[str, ...] = ()  # checkpoint tensors the converter leaves out
    ssm: bool = False  # Mamba: A_log stored as A = -exp(A_log)
    squeeze: tuple[str, ...] = ()  # conv weights [channels, 1, kernel] stored as [channels, kernel]
    gate_up: str = ""  # a fused [experts, gate | up, in] tensor the converter splits (Granite MoE's)
    strip: str = ""  # a prefix the converter drops from checkpoint names before its tensor map (Bloom's)
    llama3_rope: bool = False  # llama3 rope scaling as rope_freqs: graphs of llama.cpp that read it
    check: Callable[[dict, Path], None] = field(default=lambda config, path: None)
    sentencepiece: str | None = None  # a tokenizer.model alone: "llama", "no-space-prefix" (Gemma 2 / 3)

    def map_key(self, key: str) -> str:
        """The checkpoint name as the converter looks it up in llama.cpp's tensor map."""
        return key.removeprefix(self.strip) if self.strip else key


def _query_scale(config: dict, path: Path) -> None:
    """llama.cpp scales Gemma 2 / 3 queries by 1/sqrt(head_dim): a config that says otherwise is refused."""
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != config["head_dim"]:
        raise UnsupportedError(
            f"query_pre_attn_scalar {scalar} != head_dim {config['head_dim']}: llama.cpp scales the "
            "queries by 1/sqrt(head_dim) (except for its 27B models)",
            path=path / "config.json",
            fix="use --target merged or hooks",
        )


def _router_norm(normalized: bool) -> Callable[[dict, Path], None]:
    """llama.cpp's graph renormalizes the top-k router weights (Qwen3-MoE) or not (Qwen2-MoE), always."""

    def check(config: dict, path: Path) -> None:
        if bool(config.get("norm_topk_prob", normalized)) != normalized:
            raise UnsupportedError(
                f"norm_topk_prob {config.get('norm_topk_prob')}: llama.cpp's graph for this family "
                f"{'always' if normalized else 'never'} renormalizes the routing weights",
                path=path / "config.json",
                fix="use --target merged or hooks",
            )

    return check


def _qk_layernorm(config: dict, path: Path) -> None:
    """StableLM's per-head q / k LayerNorms (the converter stacks them); Phi's (none in llama.cpp)."""
    if config.get("qk_layernorm"):
        raise UnsupportedError(f"qk_layernorm: the gguf target does not write {config['model_type']}'s q / k "
                               "norms (StableLM's per-head norms are stacked by llama.cpp's converter; "
                               "llama.cpp's phi2 graph has none)", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def _own_head(config: dict, path: Path) -> None:
    """llama.cpp's OLMo 2, StableLM and Phi-2 graphs read a head of their own, which a tied base has not."""
    if config.get("tie_word_embeddings"):
        raise UnsupportedError(f"tie_word_embeddings true: llama.cpp's {config['model_type']} graph reads a "
                               "head of its own (output.weight), which the converter writes from lm_head",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def _both(*checks: Callable[[dict, Path], None]) -> Callable[[dict, Path], None]:
    """A check made of several."""

    def check(config: dict, path: Path) -> None:
        for one in checks:
            one(config, path)

    return check


def _falcon(config: dict, path: Path) -> None:
    """llama.cpp's Falcon graph: rotary, parallel attention and MLP, no biases in the linear layers."""
    for key, says in (("alibi", True), ("parallel_attn", False), ("bias", True)):
        if bool(config.get(key, not says)) == says:
            raise UnsupportedError(f"{key} {str(says).lower()}: llama.cpp's Falcon graph has rotary "
                                   "positions, parallel attention and MLP and no biases in its linear layers",
                                   path=path / "config.json", fix="use --target merged")  # fmt: skip


def _tied(config: dict, path: Path) -> None:
    """llama.cpp's Command-R graphs tie the head to the embedding and have no attention biases."""
    if not config.get("tie_word_embeddings", True) or config.get("attention_bias"):
        raise UnsupportedError(f"tie_word_embeddings {config.get('tie_word_embeddings')}, attention_bias "
                               f"{config.get('attention_bias')}: llama.cpp's {config['model_type']} graph "
                               "ties the head to the embedding and has no attention biases",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def _ernie_bias(config: dict, path: Path) -> None:
    """llama.cpp's ERNIE 4.5 graph reads no q / k / v / MLP biases."""
    if config.get("use_bias"):
        raise UnsupportedError("use_bias true: llama.cpp's ERNIE 4.5 graph has no q / k / v or MLP biases",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def _cohere(config: dict, path: Path) -> None:
    """llama.cpp's Command-R graph: the head tied, q / k norms exactly in models of 64 layers or more."""
    _tied(config, path)
    deep = config["num_hidden_layers"] >= 64
    if bool(config.get("use_qk_norm")) != deep:
        raise UnsupportedError(f"use_qk_norm {config.get('use_qk_norm')} with {config['num_hidden_layers']} "
                               "layers: llama.cpp's Command-R graph has q / k norms exactly in models of 64 "
                               "layers or more", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def _olmoe(config: dict, path: Path) -> None:
    """llama.cpp's OLMoE graph: q / k norms as wide as the model (no grouped kv heads), no clip_qkv."""
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if n_kv != config["num_attention_heads"] or config.get("clip_qkv") is not None:
        raise UnsupportedError(f"num_key_value_heads {n_kv}, clip_qkv {config.get('clip_qkv')}: llama.cpp's "
                               "OLMoE graph has a kv head per head and no clamp", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def _mamba(config: dict, path: Path) -> None:
    """The converter pads Mamba's vocabulary to pad_vocab_size_multiple and assumes an expansion of 2."""
    pad = config.get("pad_vocab_size_multiple", 8)
    d_model = config["hidden_size"]
    if config["vocab_size"] % pad or (config.get("intermediate_size") or 2 * d_model) != 2 * d_model:
        raise UnsupportedError(f"vocab_size {config['vocab_size']} (pad_vocab_size_multiple {pad}), "
                               f"intermediate_size {config.get('intermediate_size')}: the converter pads the "
                               "vocabulary and writes Mamba with an expansion of 2",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def _exaone4(config: dict, path: Path) -> None:
    """llama.cpp's EXAONE 4 graph: sliding windows, rope-less global layers exactly in 64-layer models."""
    n_layers, window = config["num_hidden_layers"], config.get("sliding_window")
    if (n_layers == 64) != (window is not None):
        raise UnsupportedError(f"sliding_window {window} with {n_layers} layers: llama.cpp's EXAONE 4 graph "
                               "has sliding windows and rope-less global layers exactly in 64-layer models "
                               "(the 32B)", path=path / "config.json", fix="use --target merged")  # fmt: skip


def _smollm3_layers(config: dict, path: Path) -> None:
    """llama.cpp's SmolLM3 graph: rope in every layer but each fourth, full attention everywhere."""
    n_layers = config["num_hidden_layers"]
    expected = [int((layer + 1) % 4 != 0) for layer in range(n_layers)]
    if (rope := config.get("no_rope_layers")) is not None and list(rope) != expected:
        raise UnsupportedError(f"no_rope_layers {rope}: llama.cpp's SmolLM3 graph leaves out rope in every "
                               f"fourth layer only ({expected})", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
        raise UnsupportedError("sliding-window attention: llama.cpp's SmolLM3 graph attends over the whole "
                               "context", path=path / "config.json", fix="use --target merged")  # fmt: skip


_GATE_UP = "block_sparse_moe.input_linear.weight"  # Granite MoE's experts: [experts, gate | up, in]
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
    "olmo": GgufFamily(gguf.MODEL_ARCH.OLMO, hp.olmo, permute_qk=True),
    "olmo2": GgufFamily(gguf.MODEL_ARCH.OLMO2, hp.olmo2, check=_own_head),
    "olmo3": GgufFamily(gguf.MODEL_ARCH.OLMO2, hp.olmo2, check=_own_head),
    "stablelm": GgufFamily(gguf.MODEL_ARCH.STABLELM, own.stablelm, check=_both(_qk_layernorm, _own_head)),
    "starcoder2": GgufFamily(gguf.MODEL_ARCH.STARCODER2, hp.text),
    "phi": GgufFamily(gguf.MODEL_ARCH.PHI2, own.phi2, check=_both(_qk_layernorm, _own_head)),
    "falcon": GgufFamily(gguf.MODEL_ARCH.FALCON, own.falcon, qkv=_GROUPED, check=_falcon),
    "bloom": GgufFamily(gguf.MODEL_ARCH.BLOOM, own.bloom, qkv=_HEADWISE, strip="transformer."),
    "gpt_bigcode": GgufFamily(gguf.MODEL_ARCH.STARCODER, own.gpt_bigcode, qkv=_GROUPED, qkv_name="c_attn"),
    "mpt": GgufFamily(gguf.MODEL_ARCH.MPT, own.mpt),
    "arcee": GgufFamily(gguf.MODEL_ARCH.ARCEE, hp.llama, permute_qk=True, llama3_rope=True),
    "seed_oss": GgufFamily(gguf.MODEL_ARCH.SEED_OSS, hp.text),
    "exaone4": GgufFamily(gguf.MODEL_ARCH.EXAONE4, hp.exaone4, llama3_rope=True, check=_exaone4),
    "cohere": GgufFamily(gguf.MODEL_ARCH.COMMAND_R, hp.cohere, dropped=_TIED_HEAD, check=_cohere),
    "cohere2": GgufFamily(gguf.MODEL_ARCH.COHERE2, hp.cohere2, dropped=_TIED_HEAD, check=_tied),
    "glm4": GgufFamily(gguf.MODEL_ARCH.GLM4, hp.glm4),
    "ernie4_5": GgufFamily(gguf.MODEL_ARCH.ERNIE4_5, hp.text, check=_ernie_bias),
    "nemotron": GgufFamily(gguf.MODEL_ARCH.NEMOTRON, hp.nemotron, norm_plus_one=True),  # layernorm1p: w + 1
    "olmoe": GgufFamily(gguf.MODEL_ARCH.OLMOE, hp.text, check=_both(_router_norm(False), _olmoe)),
    "glm": GgufFamily(gguf.MODEL_ARCH.CHATGLM, hp.glm),
    "mamba": GgufFamily(
        gguf.MODEL_ARCH.MAMBA, own.mamba, ssm=True, squeeze=("mixer.conv1d.weight",), check=_mamba
    ),
    "lfm2": GgufFamily(gguf.MODEL_ARCH.LFM2, hp.lfm2, squeeze=("conv.conv.weight",)),
    "smollm3": GgufFamily(gguf.MODEL_ARCH.SMOLLM3, hp.llama, permute_qk=True, check=_smollm3_layers),
    "qwen2": GgufFamily(gguf.MODEL_ARCH.QWEN2, hp.text),
    "qwen3": GgufFamily(gguf.MODEL_ARCH.QWEN3, hp.text),
    "qwen2_moe": GgufFamily(gguf.MODEL_ARCH.QWEN2MOE, hp.qwen_moe, check=_router_norm(False)),
    "qwen3_moe": GgufFamily(gguf.MODEL_ARCH.QWEN3MOE, hp.qwen_moe, check=_router_norm(True)),
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
        check=_query_scale,
        sentencepiece="no-space-prefix",
    ),
    "gemma3_text": GgufFamily(
        gguf.MODEL_ARCH.GEMMA3,
        hp.gemma3,
        norm_plus_one=True,
        check=_query_scale,
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
