"""What llama.cpp's converter (convert_hf_to_gguf) does per family, as small tables.

Each family names its GGUF architecture, the hyperparameters the converter writes from config.json,
and the few tensor rewrites it makes: llama's rotary permutation of q/k rows, Gemma's RMSNorm
weights stored as (1 + w), GPT-2's Conv1D weights transposed, GPT-NeoX's per-head qkv regrouped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.gguf.rope import check_rope, rope_params

__all__ = ["FAMILIES", "GgufFamily", "family_of", "permute_rows"]

Writer = gguf.GGUFWriter


@dataclass(frozen=True, slots=True)
class GgufFamily:
    """One family's GGUF architecture, hyperparameters and tensor rewrites."""

    arch: gguf.MODEL_ARCH
    hparams: Callable[[Writer, dict], None]
    permute_qk: bool = False  # llama's rotary layout: q / k rows regrouped per head (LlamaModel.permute)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w); llama.cpp by its stored weight: w + 1
    transposed: tuple[str, ...] = ()  # Conv1D weights stored [in, out]: name suffixes
    neox_qkv: bool = False  # query_key_value per head (n_head, 3, d): regrouped as [q | k | v]
    dropped: tuple[str, ...] = ()  # checkpoint tensors the converter leaves out
    check: Callable[[dict, Path], None] = field(default=lambda config, path: None)
    sentencepiece: str | None = None  # a tokenizer.model alone: "llama", "no-space-prefix" (Gemma 2 / 3)


def _get(config: dict, *keys: str, default=None):
    """The first of `keys` the config sets (the converter's find_hparam)."""
    return next((config[key] for key in keys if config.get(key) is not None), default)


def _text(w: Writer, config: dict) -> None:
    """TextModel.set_gguf_parameters: the keys most families share."""
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(_get(config, "max_position_embeddings", "n_ctx", "n_positions"))
    w.add_embedding_length(_get(config, "hidden_size", "n_embd"))
    if (n_ff := _get(config, "intermediate_size", "n_inner")) is not None:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(_get(config, "num_attention_heads", "n_head"))
    if (n_kv := _get(config, "num_key_value_heads", "n_kv_heads")) is not None:
        w.add_head_count_kv(n_kv)
    if (theta := rope_params(config).get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (eps := _get(config, "rms_norm_eps", "norm_eps")) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _get(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
        w.add_layer_norm_eps(eps)
    if (n := _get(config, "num_local_experts", "num_experts")) is not None:
        w.add_expert_count(n)
    if (n := _get(config, "num_experts_per_tok")) is not None:
        w.add_expert_used_count(n)
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _llama(w: Writer, config: dict) -> None:
    _text(w, config)
    w.add_vocab_size(config["vocab_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    w.add_rope_dimension_count(head_dim)


def _qwen_moe(w: Writer, config: dict) -> None:
    _text(w, config)
    if (n := config.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(n)
    if (n := config.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(n)


def _gpt2(w: Writer, config: dict) -> None:
    w.add_block_count(config["n_layer"])
    w.add_context_length(config["n_ctx"] if "n_ctx" in config else config["n_positions"])
    w.add_embedding_length(config["n_embd"])
    w.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    w.add_head_count(config["n_head"])
    w.add_layer_norm_eps(config["layer_norm_epsilon"])


def _gpt_neox(w: Writer, config: dict) -> None:
    rotary = _get(config, "rotary_pct", default=rope_params(config).get("partial_rotary_factor", 1.0))
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_rope_dimension_count(int(rotary * (config["hidden_size"] // config["num_attention_heads"])))
    w.add_head_count(config["num_attention_heads"])
    w.add_parallel_residual(config.get("use_parallel_residual", True))
    w.add_layer_norm_eps(config["layer_norm_eps"])
    if (theta := rope_params(config).get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)


def _phi3(w: Writer, config: dict) -> None:
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rotary = _get(config, "partial_rotary_factor") or rope_params(config).get("partial_rotary_factor", 1.0)
    w.add_context_length(config["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings")
                                    or config["max_position_embeddings"])  # fmt: skip
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(int(rotary * n_embd) // n_head)
    w.add_rope_freq_base(rope_params(config).get("rope_theta") or 10000.0)
    w.add_sliding_window(config.get("sliding_window") or 0)


def _gemma(w: Writer, config: dict) -> None:
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    if (theta := rope_params(config).get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)


def _gemma2(w: Writer, config: dict) -> None:
    _gemma(w, config)
    w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    w.add_final_logit_softcapping(config["final_logit_softcapping"])
    w.add_sliding_window(config["sliding_window"])


def _gemma3(w: Writer, config: dict) -> None:
    _text(w, config)
    w.add_rope_freq_base(rope_params(config).get("rope_theta") or 1_000_000.0)
    if final := config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(final)
    if config.get("sliding_window_pattern") != 1:
        w.add_sliding_window(config["sliding_window"])
    if (local := config.get("rope_local_base_freq")) is not None:
        w.add_rope_freq_base_swa(local)
    w.add_head_count_kv(config.get("num_key_value_heads", 4))


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


_GEMMA_DROPPED = ("lm_head.weight",)  # the converter skips it: llama.cpp ties Gemma's head

FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True, sentencepiece="llama"),
    "mistral": GgufFamily(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True, sentencepiece="llama"),
    "mixtral": GgufFamily(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True, sentencepiece="llama"),
    "qwen2": GgufFamily(gguf.MODEL_ARCH.QWEN2, _text),
    "qwen3": GgufFamily(gguf.MODEL_ARCH.QWEN3, _text),
    "qwen2_moe": GgufFamily(gguf.MODEL_ARCH.QWEN2MOE, _qwen_moe, check=_router_norm(False)),
    "qwen3_moe": GgufFamily(gguf.MODEL_ARCH.QWEN3MOE, _qwen_moe, check=_router_norm(True)),
    "gpt2": GgufFamily(
        gguf.MODEL_ARCH.GPT2, _gpt2, transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    ),
    "gpt_neox": GgufFamily(gguf.MODEL_ARCH.GPTNEOX, _gpt_neox, neox_qkv=True),
    "phi3": GgufFamily(gguf.MODEL_ARCH.PHI3, _phi3),
    "gemma": GgufFamily(gguf.MODEL_ARCH.GEMMA, _gemma, norm_plus_one=True, dropped=_GEMMA_DROPPED),
    "gemma2": GgufFamily(
        gguf.MODEL_ARCH.GEMMA2,
        _gemma2,
        norm_plus_one=True,
        dropped=_GEMMA_DROPPED,
        check=_query_scale,
        sentencepiece="no-space-prefix",
    ),
    "gemma3_text": GgufFamily(
        gguf.MODEL_ARCH.GEMMA3,
        _gemma3,
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
    check_rope(config, path, llama3=family.permute_qk, longrope=family.arch is gguf.MODEL_ARCH.PHI3)
    return family


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Llama's q / k rows regrouped per head for llama.cpp's rotary layout (LlamaModel.permute)."""
    grouped = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)
