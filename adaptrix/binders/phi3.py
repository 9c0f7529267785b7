"""Phi-3: `qkv_proj` fuses q, k, v in blocks with the GQA sizes; `gate_up_proj` fuses gate and up."""

from adaptrix.binders.llama import DECODER_CONFIG_KEYS, HEADS, NORMS
from adaptrix.binders.table import Binder, Module, Split
from adaptrix.ir.values import Role

BINDER = Binder(
    name="phi3",
    model_types=("phi3",),
    layer_container="layers",
    layer_modules={
        # In the model's own module order (Phi3Attention declares o_proj first): PEFT walks
        # modules in this order, and combine's dare methods draw their random masks in it.
        "self_attn.o_proj": Module((Role.ATTN_O,)),
        "self_attn.qkv_proj": Module(
            (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V),
            split=Split("blocked", ("q_size", "kv_size", "kv_size")),
        ),
        "mlp.gate_up_proj": Module(
            (Role.MLP_GATE, Role.MLP_UP),
            split=Split("blocked", ("intermediate_size", "intermediate_size")),
        ),
        "mlp.down_proj": Module((Role.MLP_DOWN,)),
        **NORMS,
    },
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
)
