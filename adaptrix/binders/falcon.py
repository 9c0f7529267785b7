"""Falcon: `query_key_value` fuses q, k, v per key/value group; one of three attention layouts.

Falcon 7B (multi_query): every query head shares one kv head, q | k | v in blocks. Falcon 40B / 180B
(new_decoder_architecture): per kv head, its query heads, its key, its value. Without either: per
head q, k, v. The `grouped` split is all three, given the kv heads that MultiQuery reads. The norms
differ by variant too: input_layernorm (parallel attention), ln_attn / ln_mlp (new architecture),
post_attention_layernorm (sequential attention and MLP).
"""

from adaptrix.binders.table import Binder, Layout, Module, MultiQuery, Split
from adaptrix.ir.values import Role

NORMS = {
    "input_layernorm": Module((Role.ATTN_NORM,), Layout.NORM),
    "ln_attn": Module((Role.ATTN_NORM,), Layout.NORM),
    "ln_mlp": Module((Role.MLP_NORM,), Layout.NORM),
    "post_attention_layernorm": Module((Role.MLP_NORM,), Layout.NORM),
}

BINDER = Binder(
    name="falcon",
    model_types=("falcon",),
    layer_container="h",
    layer_modules={
        "self_attention.query_key_value": Module(
            (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V), split=Split("grouped", ("q", "k", "v"))
        ),
        "self_attention.dense": Module((Role.ATTN_O,)),
        "mlp.dense_h_to_4h": Module((Role.MLP_UP,)),
        "mlp.dense_4h_to_h": Module((Role.MLP_DOWN,)),
        **NORMS,
    },
    model_modules={
        "word_embeddings": Module((Role.EMBED,), Layout.EMBEDDING),
        "ln_f": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys={  # as FalconConfig reads them (n_embed: its old name, which wins)
        "hidden_size": ("n_embed", "hidden_size"),
        "num_layers": ("num_hidden_layers",),
        "num_heads": ("num_attention_heads",),
        "num_kv_heads": ("num_kv_heads",),
        "intermediate_size": ("ffn_hidden_size",),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
    multi_query=MultiQuery("multi_query", default=True, unless="new_decoder_architecture"),
    optional_modules=frozenset(NORMS),
)
