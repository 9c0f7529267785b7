"""OPT: q/k/v and out_proj, fc1 / fc2 directly in the layer, learned positions (offset by 2).

A layer's `final_layer_norm` is the MLP's norm; the decoder's own `final_layer_norm` is the final
norm. With do_layer_norm_before=False (OPT-350M) the norms follow their block instead.
"""

from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="opt",
    model_types=("opt",),
    layer_container="layers",
    # In the model's own module order, as PEFT walks them (combine's dare draws its masks in it).
    layer_modules={
        "self_attn.k_proj": Module((Role.ATTN_K,)),
        "self_attn.v_proj": Module((Role.ATTN_V,)),
        "self_attn.q_proj": Module((Role.ATTN_Q,)),
        "self_attn.out_proj": Module((Role.ATTN_O,)),
        "self_attn_layer_norm": Module((Role.ATTN_NORM,), Layout.NORM),
        "fc1": Module((Role.MLP_UP,)),
        "fc2": Module((Role.MLP_DOWN,)),
        "final_layer_norm": Module((Role.MLP_NORM,), Layout.NORM),
    },
    model_modules={
        "embed_tokens": Module((Role.EMBED,), Layout.EMBEDDING),
        "embed_positions": Module((Role.EMBED_POS,), Layout.EMBEDDING),
        "final_layer_norm": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys={
        "hidden_size": ("hidden_size",),
        "num_layers": ("num_hidden_layers",),
        "num_heads": ("num_attention_heads",),
        "intermediate_size": ("ffn_dim",),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
)
