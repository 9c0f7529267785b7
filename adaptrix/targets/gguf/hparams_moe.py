"""The hyperparameters llama.cpp's converter writes for the mixture-of-experts families (set_gguf_parameters).

As in hparams_own.py, where the converter writes what the config can contradict, or what transformers'
config does not name, the file gets what the checkpoint computes.
"""

from __future__ import annotations

from gguf import ExpertGatingFuncType

from adaptrix.targets.gguf.config_keys import head_dim
from adaptrix.targets.gguf.hparams import Writer, get, granite, text
from adaptrix.targets.gguf.rope import rope_params

__all__ = [
    "dbrx",
    "deepseek2",
    "dots1",
    "ernie4_5_moe",
    "glm4_moe",
    "granitemoeshared",
    "hunyuan_moe",
    "qwen_moe",
]


def qwen_moe(w: Writer, config: dict) -> None:
    """Qwen2MoeModel / Qwen3MoeModel: TextModel's keys and the experts' widths."""
    text(w, config)
    if (n := config.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(n)
    if (n := config.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(n)


def hunyuan_moe(w: Writer, config: dict) -> None:
    """HunYuanMoEModel's keys from transformers' config: one shared expert, experts intermediate_size wide."""
    text(w, {**config, "num_experts_per_tok": None})
    w.add_expert_shared_feed_forward_length(config["intermediate_size"])
    w.add_expert_feed_forward_length(_one(config.get("moe_intermediate_size") or config["intermediate_size"]))
    w.add_expert_used_count(_one(config["moe_topk"]))
    w.add_expert_shared_count(_one(config.get("num_shared_expert") or 1))


def _one(value):
    """A per-layer list's one value (the converter asserts they are all equal), or the value."""
    return value[0] if isinstance(value, list) else value


def ernie4_5_moe(w: Writer, config: dict) -> None:
    """Ernie4_5MoeModel, with the shared experts' width transformers computes.

    That is moe_intermediate_size times their count, where the converter writes
    intermediate_size // num_key_value_heads.
    """
    text(w, {**config, "num_experts": None, "num_experts_per_tok": None})
    w.add_expert_count(config["moe_num_experts"])
    w.add_expert_used_count(config["moe_k"])
    w.add_interleave_moe_layer_step(config["moe_layer_interval"])
    w.add_leading_dense_block_count(config["moe_layer_start_index"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if shared := config.get("moe_num_shared_experts"):
        w.add_expert_shared_count(shared)
        w.add_expert_shared_feed_forward_length(config["moe_intermediate_size"] * shared)


def deepseek2(w: Writer, config: dict) -> None:
    """DeepseekV2Model (V2 and V3): MLA as MQA of kv_lora_rank + rope wide keys, the experts and routing."""
    text(w, {**config, "num_key_value_heads": 1, "head_dim": None,
             "rms_norm_eps": config.get("rms_norm_eps", 1e-6)})  # fmt: skip
    if (n := config.get("n_group")) is not None:
        w.add_expert_group_count(n)
    if (n := config.get("topk_group")) is not None:
        w.add_expert_group_used_count(n)
    # transformers' DeepSeek-V3 router is sigmoid-only and its config names no scoring_func
    if (
        score := config.get("scoring_func", "sigmoid" if config["model_type"] == "deepseek_v3" else None)
    ) is not None:
        w.add_expert_gating_func(
            ExpertGatingFuncType.SIGMOID if score == "sigmoid" else ExpertGatingFuncType.SOFTMAX
        )
    moe = config.get("n_routed_experts") is not None
    dense = config.get("first_k_dense_replace")
    w.add_leading_dense_block_count(
        dense if dense is not None else (0 if moe else config["num_hidden_layers"])
    )
    rank, rope = config.get("kv_lora_rank", 512), config["qk_rope_head_dim"]
    w.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        w.add_q_lora_rank(config["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(config["qk_nope_head_dim"] + rope)
    w.add_value_length_mla(config["v_head_dim"])
    w.add_expert_feed_forward_length(get(config, "moe_intermediate_size", "intermediate_size"))
    if moe:
        w.add_expert_count(config["n_routed_experts"])
    w.add_expert_shared_count(config.get("n_shared_experts") or 0)
    if (scale := config.get("routed_scaling_factor")) is not None:
        w.add_expert_weights_scale(scale)
    if config.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)


def dbrx(w: Writer, config: dict) -> None:
    """DbrxModel, with no clamp where clip_qkv is None (the converter fails there)."""
    ffn, attn = config["ffn_config"], config["attn_config"]
    w.add_block_count(config["n_layers"])
    w.add_context_length(config["max_seq_len"])
    w.add_embedding_length(config["d_model"])
    w.add_feed_forward_length(ffn["ffn_hidden_size"])
    w.add_head_count(config["n_heads"])
    w.add_head_count_kv(attn["kv_n_heads"])
    w.add_rope_freq_base(attn["rope_theta"])
    w.add_clamp_kqv(attn.get("clip_qkv") or 0.0)  # 0: llama.cpp does not clamp
    w.add_expert_count(ffn["moe_num_experts"])
    w.add_expert_used_count(ffn["moe_top_k"])
    w.add_layer_norm_eps(1e-5)


def dots1(w: Writer, config: dict) -> None:
    """Dots1Model, with the groups and the sigmoid gating transformers' router computes.

    transformers' config names no scoring_func: the converter writes none, which llama.cpp's dots1
    graph cannot run.
    """
    qwen_moe(w, {**config, "num_experts": config["n_routed_experts"]})
    w.add_leading_dense_block_count(config["first_k_dense_replace"])
    w.add_expert_shared_count(config["n_shared_experts"])
    w.add_expert_weights_scale(config["routed_scaling_factor"])
    w.add_expert_weights_norm(config["norm_topk_prob"])
    w.add_expert_group_count(config.get("n_group") or 1)
    w.add_expert_group_used_count(config.get("topk_group") or 1)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


def glm4_moe(w: Writer, config: dict) -> None:
    """Glm4MoeModel without its multi-token-prediction layers (transformers' checkpoints have none)."""
    text(w, config)
    w.add_expert_group_count(config.get("n_group") or 1)
    w.add_expert_group_used_count(config.get("topk_group") or 1)
    rotary = rope_params(config).get("partial_rotary_factor") or 0.5
    w.add_rope_dimension_count(int(head_dim(config) * rotary))
    w.add_expert_count(config["n_routed_experts"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_expert_shared_count(config["n_shared_experts"])
    w.add_leading_dense_block_count(config["first_k_dense_replace"])
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(config["routed_scaling_factor"])
    w.add_expert_weights_norm(config["norm_topk_prob"])


def granitemoeshared(w: Writer, config: dict) -> None:
    """GraniteMoeModel for GraniteMoeShared: Granite's keys and the shared MLP's width."""
    granite(w, config)
    if width := config.get("shared_intermediate_size"):
        w.add_expert_shared_feed_forward_length(width)
