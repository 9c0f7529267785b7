"""Gemma 2, Gemma 3 (text): four norms per layer, a pre- and a post-norm around each block.

input_layernorm and pre_feedforward_layernorm feed the attention and the MLP (ATTN_NORM,
MLP_NORM); post_attention_layernorm and post_feedforward_layernorm normalise each block's output
before the residual add and have no role. Gemma 3's q_norm / k_norm (per head) have none either.
"""

from adaptrix.binders.llama import DECODER_CONFIG_KEYS, HEADS
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

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

BINDER = Binder(
    name="gemma2",
    model_types=("gemma2", "gemma3_text"),
    layer_container="layers",
    layer_modules={
        **ATTENTION,
        **MLP,
        "input_layernorm": Module((Role.ATTN_NORM,), Layout.NORM),
        "pre_feedforward_layernorm": Module((Role.MLP_NORM,), Layout.NORM),
    },
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
    tie_default=True,
)
