"""The hyperparameters llama.cpp's converter writes from config.json, per family (set_gguf_parameters)."""

from __future__ import annotations

import gguf

from adaptrix.targets.gguf.config_keys import get, head_dim
from adaptrix.targets.gguf.rope import rope_dims, rope_params, swa_rope_theta

__all__ = [
    "Writer",
    "cohere",
    "cohere2",
    "exaone4",
    "gemma",
    "gemma2",
    "gemma3",
    "get",
    "glm",
    "glm4",
    "granite",
    "lfm2",
    "llama",
    "nemotron",
    "olmo",
    "olmo2",
    "phi3",
    "text",
]

Writer = gguf.GGUFWriter


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
    if (width := config.get("head_dim")) is not None:
        w.add_key_length(width)
        w.add_value_length(width)


def llama(w: Writer, config: dict) -> None:
    """LlamaModel: TextModel's keys, the vocabulary size and the rotary width."""
    text(w, config)
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(head_dim(config))


def phi3(w: Writer, config: dict) -> None:
    """Phi3MiniModel (longrope's factors and attention factor: rope.py)."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    w.add_context_length(config["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings")
                                    or config["max_position_embeddings"])  # fmt: skip
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims(config))
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


def cohere(w: Writer, config: dict) -> None:
    """CommandR2Model: TextModel's keys (context: model_max_length), the logit scale, no rope scaling."""
    text(w, {**config, "max_position_embeddings": get(config, "model_max_length", "max_position_embeddings")})
    w.add_logit_scale(config["logit_scale"])
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


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


def exaone4(w: Writer, config: dict) -> None:
    """Exaone4Model: TextModel's keys, the vocabulary size, the sliding window and its layers."""
    text(w, config)
    w.add_vocab_size(config["vocab_size"])
    if config.get("sliding_window") is not None:
        w.add_sliding_window(config["sliding_window"])
        pattern, n_layers = config.get("sliding_window_pattern"), config["num_hidden_layers"]
        if "layer_types" in config:
            w.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])
        elif isinstance(pattern, str):  # e.g. LLLG
            w.add_sliding_window_pattern([pattern[layer % len(pattern)] == "L" for layer in range(n_layers)])
        elif isinstance(pattern, int):
            w.add_sliding_window_pattern([(layer + 1) % pattern != 0 for layer in range(n_layers)])


def cohere2(w: Writer, config: dict) -> None:
    """Cohere2Model: TextModel's keys, the logit scale, the sliding window and layers, the rotary width."""
    text(w, config)
    w.add_logit_scale(config["logit_scale"])
    w.add_sliding_window(config["sliding_window"])
    if (types := config.get("layer_types")) is not None:  # llama.cpp's default: 3 sliding layers, 1 global
        w.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])
    w.add_vocab_size(config["vocab_size"])
    rotary = get(config, "rotary_pct", "partial_rotary_factor", default=1.0)
    w.add_rope_dimension_count(int(rotary * (config["hidden_size"] // config["num_attention_heads"])))
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def glm4(w: Writer, config: dict) -> None:
    """Glm4Model: TextModel's keys and the partial rotary width."""
    text(w, config)
    rotary = rope_params(config).get("partial_rotary_factor") or config.get("partial_rotary_factor", 0.5)
    w.add_rope_dimension_count(int(head_dim(config) * rotary))


def nemotron(w: Writer, config: dict) -> None:
    """NemotronModel: TextModel's keys, the vocabulary size, the LayerNorm eps, the partial rotary width."""
    text(w, config)
    w.add_vocab_size(config["vocab_size"])
    w.add_layer_norm_eps(get(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps"))
    rotary = get(config, "partial_rotary_factor") or rope_params(config).get("partial_rotary_factor", 1.0)
    w.add_rope_dimension_count(int(rotary * config["hidden_size"]) // config["num_attention_heads"])
    if rope_params(config).get("factor") is None:  # linear scaling's keys: add_rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def glm(w: Writer, config: dict) -> None:
    """ChatGLMModel for transformers' GlmForCausalLM, with the config's rms eps, rope base and head width."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    w.add_context_length(config.get("seq_length") or config["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rotary = rope_params(config).get("partial_rotary_factor") or config.get("partial_rotary_factor", 0.5)
    w.add_rope_dimension_count(int(head_dim(config) * rotary))
    w.add_add_bos_token(False)
    w.add_rope_freq_base(rope_params(config).get("rope_theta") or 10000.0)


def lfm2(w: Writer, config: dict) -> None:
    """LFM2Model: TextModel's keys (kv heads per layer, 0 in conv layers), the conv cache, the ffn width."""
    kinds = config["layer_types"]
    kv = [config["num_key_value_heads"] if kind != "conv" else 0 for kind in kinds]
    text(w, {**config, "num_key_value_heads": kv, "intermediate_size": None, "n_inner": None})
    w.add_vocab_size(config["vocab_size"])
    w.add_shortconv_l_cache(config["conv_L_cache"])
    ff = get(config, "block_ff_dim", "intermediate_size")
    if config["block_auto_adjust_ff_dim"]:
        ff = int(2 * ff / 3)
        if (multiplier := config.get("block_ffn_dim_multiplier")) is not None:
            ff = int(multiplier * ff)
        multiple = config["block_multiple_of"]
        ff = multiple * ((ff + multiple - 1) // multiple)
    w.add_feed_forward_length(ff)
