"""LLaMA, Mistral, Qwen2, Qwen3: separate q/k/v/o and gate/up/down projections.

Qwen2 adds q/k/v biases; Qwen3 per-head q_norm / k_norm, which have no role.
"""

from adaptrix.binders.table import Binder, BlockPoints, Layout, Module
from adaptrix.ir.values import Role

DECODER_CONFIG_KEYS = {
    "hidden_size": ("hidden_size",),
    "num_layers": ("num_hidden_layers",),
    "num_heads": ("num_attention_heads",),
    "num_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size",),
    "vocab_size": ("vocab_size",),
}

ATTENTION = {
    "self_attn.q_proj": Module((Role.ATTN_Q,)),
    "self_attn.k_proj": Module((Role.ATTN_K,)),
    "self_attn.v_proj": Module((Role.ATTN_V,)),
    "self_attn.o_proj": Module((Role.ATTN_O,)),
}

MLP = {
    "mlp.gate_proj": Module((Role.MLP_GATE,)),
    "mlp.up_proj": Module((Role.MLP_UP,)),
    "mlp.down_proj": Module((Role.MLP_DOWN,)),
}

NORMS = {
    "input_layernorm": Module((Role.ATTN_NORM,), Layout.NORM),
    "post_attention_layernorm": Module((Role.MLP_NORM,), Layout.NORM),
}

HEADS = {
    "embed_tokens": Module((Role.EMBED,), Layout.EMBEDDING),
    "norm": Module((Role.FINAL_NORM,), Layout.NORM),
    "lm_head": Module((Role.LM_HEAD,)),
    "score": Module((Role.CLS_HEAD,)),
}

BINDER = Binder(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layer_container="layers",
    layer_modules={**ATTENTION, **MLP, **NORMS},
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
    # The decoder layer adds each block's output to its residual, which enters the next norm.
    bottleneck_points={
        "attn": BlockPoints("self_attn", "self_attn", "input_layernorm", 0, "self_attn.o_proj"),
        "mlp": BlockPoints("mlp", "mlp", "post_attention_layernorm", 0, "mlp.down_proj"),
    },
)
