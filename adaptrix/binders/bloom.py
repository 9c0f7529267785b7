"""BLOOM: `query_key_value` fuses q, k, v per head, viewed as (n_head, 3, head_dim); ALiBi, no positions."""

from adaptrix.binders.table import Binder, Layout, Module, Split
from adaptrix.ir.values import Role

BINDER = Binder(
    name="bloom",
    model_types=("bloom",),
    layer_container="h",
    layer_modules={  # in the model's own module order
        "input_layernorm": Module((Role.ATTN_NORM,), Layout.NORM),
        "self_attention.query_key_value": Module(
            (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V), split=Split("headwise", ("q", "k", "v"))
        ),
        "self_attention.dense": Module((Role.ATTN_O,)),
        "post_attention_layernorm": Module((Role.MLP_NORM,), Layout.NORM),
        "mlp.dense_h_to_4h": Module((Role.MLP_UP,)),
        "mlp.dense_4h_to_h": Module((Role.MLP_DOWN,)),
    },
    model_modules={
        "word_embeddings": Module((Role.EMBED,), Layout.EMBEDDING),
        "word_embeddings_layernorm": Module((Role.EMBED_NORM,), Layout.NORM),
        "ln_f": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys={
        "hidden_size": ("n_embed", "hidden_size"),  # as BloomConfig reads them: the old name wins
        "num_layers": ("n_layer", "num_hidden_layers"),
        "num_heads": ("n_head", "num_attention_heads"),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
)
