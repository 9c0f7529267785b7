"""GPT-NeoX / Pythia: `query_key_value` fuses q, k, v per head, viewed as (n_head, 3, head_dim)."""

from adaptrix.binders.llama import DECODER_CONFIG_KEYS, NORMS
from adaptrix.binders.table import Binder, Layout, Module, Split
from adaptrix.ir.values import Role

BINDER = Binder(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layer_container="layers",
    layer_modules={
        "attention.query_key_value": Module(
            (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V), split=Split("headwise", ("q", "k", "v"))
        ),
        "attention.dense": Module((Role.ATTN_O,)),
        "mlp.dense_h_to_4h": Module((Role.MLP_UP,)),
        "mlp.dense_4h_to_h": Module((Role.MLP_DOWN,)),
        **NORMS,
    },
    model_modules={
        "embed_in": Module((Role.EMBED,), Layout.EMBEDDING),
        "final_layer_norm": Module((Role.FINAL_NORM,), Layout.NORM),
        "embed_out": Module((Role.LM_HEAD,)),
        "lm_head": Module((Role.LM_HEAD,)),  # transformers 5's name of embed_out (checkpoints keep embed_out)
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys=DECODER_CONFIG_KEYS,
    lm_head_weight="embed_out.weight",
)
