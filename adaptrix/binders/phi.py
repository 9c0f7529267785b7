"""Phi-1 / Phi-1.5 / Phi-2: q/k/v and `dense`, MLP fc1 / fc2, one LayerNorm feeding both blocks."""

from adaptrix.binders.llama import DECODER_CONFIG_KEYS
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="phi",
    model_types=("phi",),
    layer_container="layers",
    layer_modules={
        "self_attn.q_proj": Module((Role.ATTN_Q,)),
        "self_attn.k_proj": Module((Role.ATTN_K,)),
        "self_attn.v_proj": Module((Role.ATTN_V,)),
        "self_attn.dense": Module((Role.ATTN_O,)),
        "mlp.fc1": Module((Role.MLP_UP,)),
        "mlp.fc2": Module((Role.MLP_DOWN,)),
        # Attention and MLP run in parallel on the same normalised input.
        "input_layernorm": Module((Role.ATTN_NORM,), Layout.NORM),
    },
    model_modules={
        "embed_tokens": Module((Role.EMBED,), Layout.EMBEDDING),
        "final_layernorm": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys=DECODER_CONFIG_KEYS,
)
