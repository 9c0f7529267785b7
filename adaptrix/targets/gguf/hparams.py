"""The hyperparameters llama.cpp's converter writes from config.json, per family (set_gguf_parameters)."""

from __future__ import annotations

import gguf

from adaptrix.targets.gguf.rope import rope_params, swa_rope_theta

__all__ = [
    "Writer",
    "bloom",
    "cohere",
    "falcon",
    "gemma",
    "gemma2",
    "gemma3",
    "get",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "granite",
    "llama",
    "mpt",
    "olmo",
    "olmo2",
    "phi2",
    "phi3",
    "qwen_moe",
    "stablelm",
    "text",
]

Writer = gguf.GGUFWriter


def get(config: dict, *keys: str, default=None):
    """The first of `keys` the config sets (the converter's find_hparam)."""
    return next((config[key] for key in keys if config.get(key) is not None), default)


def text(w: Writer, config: dict) -> None:
    """TextModel.set_gguf_parameters: the keys most families share."""
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(get(config, "max_position_embeddings", "n_ctx", "n_positions"))
    w.add_embedding_length(get(config, "hidden_size", "n_embd"))
    if (n_ff := get(config, "intermediate_size", "n_inner")) is not None:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(get(config, "num_attention_heads", "n_head"))
    if (n_kv := get(config, "num_key_value_heads", "n_kv_heads")) is not None:
        w.add_head_count_kv(n_kv)
    if (theta := rope_params(config).get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (theta := swa_rope_theta(config)) is not None:
        w.add_rope_freq_base_swa(theta)
    if (eps := get(config, "rms_norm_eps", "norm_eps")) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := get(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
        w.add_layer_norm_eps(eps)
    if (n := get(config, "num_local_experts", "num_experts")) is not None:
        w.add_expert_count(n)
    if (n := get(config, "num_experts_per_tok")) is not None:
        w.add_expert_used_count(n)
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def llama(w: Writer, config: dict) -> None:
    """LlamaModel: TextModel's keys, the vocabulary size and the rotary width."""
    text(w, config)
    w.add_vocab_size(config["vocab_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    w.add_rope_dimension_count(head_dim)


def qwen_moe(w: Writer, config: dict) -> None:
    """Qwen2MoeModel / Qwen3MoeModel: TextModel's keys and the experts' widths."""
    text(w, config)
    if (n := config.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(n)
    if (n := config.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(n)


def gpt2(w: Writer, config: dict) -> None:
    """GPT2Model."""
    w.add_block_count(config["n_layer"])
    w.add_context_length(config["n_ctx"] if "n_ctx" in config else config["n_positions"])
    w.add_embedding_length(config["n_embd"])
    w.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    w.add_head_count(config["n_head"])
    w.add_layer_norm_eps(config["layer_norm_epsilon"])


def gpt_neox(w: Writer, config: dict) -> None:
    """GPTNeoXModel."""
    rotary = get(config, "rotary_pct", default=rope_params(config).get("partial_rotary_factor", 1.0))
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


def phi3(w: Writer, config: dict) -> None:
    """Phi3MiniModel (no longrope)."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rotary = get(config, "partial_rotary_factor") or rope_params(config).get("partial_rotary_factor", 1.0)
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


def gemma(w: Writer, config: dict) -> None:
    """GemmaModel."""
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


def gemma2(w: Writer, config: dict) -> None:
    """Gemma2Model: Gemma's keys, softcapping and the sliding window."""
    gemma(w, config)
    w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    w.add_final_logit_softcapping(config["final_logit_softcapping"])
    w.add_sliding_window(config["sliding_window"])


def gemma3(w: Writer, config: dict) -> None:
    """Gemma3Model (text)."""
    text(w, config)
    w.add_rope_freq_base(rope_params(config).get("rope_theta") or 1_000_000.0)
    if final := config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(final)
    if config.get("sliding_window_pattern") != 1:
        w.add_sliding_window(config["sliding_window"])
    if (local := config.get("rope_local_base_freq")) is not None and swa_rope_theta(config) is None:
        w.add_rope_freq_base_swa(local)
    w.add_head_count_kv(config.get("num_key_value_heads", 4))


def granite(w: Writer, config: dict) -> None:
    """GraniteModel: llama's keys (head_dim ignored) and the four multipliers as llama.cpp's scales."""
    llama(w, {key: value for key, value in config.items() if key != "head_dim"})
    scales = {"attention_multiplier": w.add_attention_scale, "embedding_multiplier": w.add_embedding_scale,
              "residual_multiplier": w.add_residual_scale, "logits_scaling": w.add_logit_scale}  # fmt: skip
    for key, add in scales.items():
        if value := config.get(key):
            add(value)


def olmo(w: Writer, config: dict) -> None:
    """OlmoModel: TextModel's keys, the weightless LayerNorm's eps (1e-5) and clip_qkv as the clamp."""
    text(w, config)
    w.add_layer_norm_eps(1e-5)
    if (clip := config.get("clip_qkv")) is not None:
        w.add_clamp_kqv(clip)


def stablelm(w: Writer, config: dict) -> None:
    """StableLMModel, plus the rope base (the converter leaves llama.cpp's default, 10000)."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rotary = get(
        config, "partial_rotary_factor", default=rope_params(config).get("partial_rotary_factor", 1.0)
    )
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_rope_dimension_count(int(rotary * (n_embd // n_head)))
    w.add_head_count(n_head)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_parallel_residual(config.get("use_parallel_residual", True))
    w.add_layer_norm_eps(get(config, "layer_norm_eps", "norm_eps"))
    w.add_rope_freq_base(rope_params(config).get("rope_theta") or 10000.0)


def phi2(w: Writer, config: dict) -> None:
    """Phi2Model, with the config's feed-forward width, kv heads and rope base (the converter: phi-2's)."""
    n_embd, n_head = get(config, "hidden_size", "n_embd"), get(config, "num_attention_heads", "n_head")
    rotary = get(config, "partial_rotary_factor") or rope_params(config).get("partial_rotary_factor", 1.0)
    w.add_context_length(get(config, "n_positions", "max_position_embeddings"))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(get(config, "intermediate_size", default=4 * n_embd))
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(get(config, "num_key_value_heads", default=n_head))
    w.add_layer_norm_eps(get(config, "layer_norm_epsilon", "layer_norm_eps"))
    w.add_rope_dimension_count(int(rotary * n_embd) // n_head)
    w.add_rope_freq_base(rope_params(config).get("rope_theta") or 10000.0)
    w.add_add_bos_token(False)


def cohere(w: Writer, config: dict) -> None:
    """CommandR2Model: TextModel's keys (context: model_max_length), the logit scale, no rope scaling."""
    text(w, {**config, "max_position_embeddings": get(config, "model_max_length", "max_position_embeddings")})
    w.add_logit_scale(config["logit_scale"])
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def falcon(w: Writer, config: dict) -> None:
    """FalconModel, with the kv heads FalconAttention reads, the config's context, ffn width, rope base."""
    n_embd, n_head = get(config, "n_embed", "hidden_size"), config["num_attention_heads"]
    if config.get("new_decoder_architecture"):
        n_kv = config.get("num_kv_heads") or n_head
    else:
        n_kv = 1 if config.get("multi_query", True) else n_head
    w.add_context_length(config.get("max_position_embeddings") or 2048)
    w.add_tensor_data_layout("jploski")  # the qkv rows regrouped as [q | k | v]
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(config.get("ffn_hidden_size") or 4 * n_embd)
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_eps(config["layer_norm_epsilon"])
    if (theta := rope_params(config).get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)


def bloom(w: Writer, config: dict) -> None:
    """BloomModel."""
    n_embd, n_head = get(config, "hidden_size", "n_embed"), get(config, "n_head", "num_attention_heads")
    w.add_context_length(config.get("seq_length", n_embd))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(4 * n_embd)
    w.add_block_count(config["n_layer"] if "n_layer" in config else config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(config["layer_norm_epsilon"])


def gpt_bigcode(w: Writer, config: dict) -> None:
    """StarCoderModel, with the config's kv heads and ffn width (the converter: multi-query, 4 * n_embd)."""
    w.add_context_length(config["n_positions"])
    w.add_embedding_length(config["n_embd"])
    w.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    w.add_block_count(config["n_layer"])
    w.add_head_count(config["n_head"])
    w.add_head_count_kv(1 if config.get("multi_query", True) else config["n_head"])
    w.add_layer_norm_eps(config["layer_norm_epsilon"])


def mpt(w: Writer, config: dict) -> None:
    """MPTModel, with the config's ffn width and LayerNorm eps (the converter: 4 * d_model, 1e-5)."""
    attn = config.get("attn_config") or {}
    w.add_context_length(config["max_seq_len"])
    w.add_embedding_length(config["d_model"])
    w.add_block_count(config["n_layers"])
    w.add_feed_forward_length(int(config.get("expansion_ratio", 4) * config["d_model"]))
    w.add_head_count(config["n_heads"])
    if kv_heads := attn.get("kv_n_heads"):
        w.add_head_count_kv(kv_heads)
    w.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    if attn.get("clip_qkv") is not None:
        w.add_clamp_kqv(attn["clip_qkv"])
    w.add_max_alibi_bias(attn.get("alibi_bias_max", 8) if attn.get("alibi", True) else 0.0)


def olmo2(w: Writer, config: dict) -> None:
    """Olmo2Model (OLMo 2 and 3): TextModel's keys; OLMo 3's sliding window and its layers."""
    text(w, config)
    if "sliding_window" in config:
        w.add_sliding_window(config["sliding_window"])
        if (types := config.get("layer_types")) is not None:
            w.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])
        else:
            w.add_sliding_window_pattern(
                [(layer + 1) % 4 != 0 for layer in range(config["num_hidden_layers"])]
            )
