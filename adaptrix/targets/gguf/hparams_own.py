"""The hyperparameters of the families whose converter class writes its own keys, not TextModel's.

Where the converter writes a constant that the config can say otherwise (a feed-forward width of
4 * hidden, one kv head, llama.cpp's default rope base), the config's value is written: the file
then computes what the checkpoint computes.
"""

from __future__ import annotations

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.targets.gguf.hparams import Writer, get
from adaptrix.targets.gguf.rope import rope_params

__all__ = [
    "bloom",
    "falcon",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "jamba",
    "mamba",
    "mamba2",
    "mpt",
    "phi2",
    "stablelm",
    "xielu",
]


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


def mamba(w: Writer, config: dict) -> None:
    """MambaModel."""
    d_model = get(config, "hidden_size", "d_model")
    _ssm_layout(w, config, d_model)
    w.add_ssm_inner_size(get(config, "intermediate_size", "d_inner", default=2 * d_model))
    w.add_ssm_state_size(get(config, "state_size", "d_state", default=16))
    w.add_ssm_time_step_rank(get(config, "time_step_rank", "dt_rank", default=-(d_model // -16)))
    w.add_layer_norm_rms_eps(get(config, "layer_norm_epsilon", "rms_norm_eps", default=1e-5))
    w.add_ssm_dt_b_c_rms(config.get("model_type") == "falcon_mamba")


_XIELU = ("alpha_n", "alpha_p", "beta", "eps")


def xielu(w: Writer, base: Checkpoint) -> None:
    """ApertusModel: each layer's xIELU parameters (stored as tensors) as per-layer metadata arrays."""
    values = {key: [] for key in _XIELU}
    for layer in range(base.config["num_hidden_layers"]):
        for key in _XIELU:
            values[key].append(base.read(f"model.layers.{layer}.mlp.act_fn.{key}").float().item())
    w.add_xielu_alpha_n(values["alpha_n"])
    w.add_xielu_alpha_p(values["alpha_p"])
    w.add_xielu_beta(values["beta"])
    w.add_xielu_eps(values["eps"])


def jamba(w: Writer, config: dict) -> None:
    """JambaModel: kv heads per layer (0 in its Mamba layers), the SSM's sizes, the experts."""
    d_model, n_layers = config["hidden_size"], config["num_hidden_layers"]
    offset, period = config["attn_layer_offset"], config["attn_layer_period"]
    kv = [
        config["num_key_value_heads"] if i >= offset and (i - offset) % period == 0 else 0
        for i in range(n_layers)
    ]
    w.add_block_count(n_layers)
    w.add_context_length(get(config, "max_position_embeddings", "n_ctx"))
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(kv)
    w.add_ssm_conv_kernel(config.get("mamba_d_conv") or 4)
    w.add_ssm_inner_size(config["mamba_expand"] * d_model)
    w.add_ssm_state_size(config.get("mamba_d_state") or 16)
    w.add_ssm_time_step_rank(config.get("mamba_dt_rank") or -(d_model // -16))
    w.add_layer_norm_rms_eps(get(config, "layer_norm_epsilon", "rms_norm_eps", default=1e-6))
    w.add_expert_count(get(config, "num_local_experts", "num_experts"))
    w.add_expert_used_count(get(config, "num_experts_per_tok", "num_experts_per_token"))


def mamba2(w: Writer, config: dict) -> None:
    """Mamba2Model."""
    d_model = get(config, "hidden_size", "d_model", "dim")
    d_inner = get(config, "mamba_d_ssm", "intermediate_size", "d_inner") or config.get("expand", 2) * d_model
    _ssm_layout(w, config, d_model)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(get(config, "state_size", "d_state", default=128))
    w.add_ssm_time_step_rank(d_inner // get(config, "mamba_d_head", "head_dim", default=64))
    w.add_ssm_group_count(config.get("n_groups") or 1)
    w.add_layer_norm_rms_eps(get(config, "layer_norm_epsilon", "rms_norm_eps", default=1e-5))


def _ssm_layout(w: Writer, config: dict, d_model: int) -> None:
    """The keys Mamba and Mamba 2 write first, in the converter's order (part of the file's bytes)."""
    w.add_context_length(2**20)  # the converter's: Mamba has no context limit
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(config["num_hidden_layers"])
    w.add_ssm_conv_kernel(get(config, "conv_kernel", "d_conv", default=4))
