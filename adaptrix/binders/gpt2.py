"""GPT-2: Conv1D weights stored [in, out]; `c_attn` fuses q, k, v in blocks along out."""

from adaptrix.binders.table import Binder, Layout, Module, Split
from adaptrix.ir.values import Role

QKV = Split("blocked", ("q_size", "kv_size", "kv_size"))

BINDER = Binder(
    name="gpt2",
    model_types=("gpt2",),
    layer_container="h",
    layer_modules={
        "attn.c_attn": Module((Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V), Layout.CONV1D, QKV),
        "attn.c_proj": Module((Role.ATTN_O,), Layout.CONV1D),
        "mlp.c_fc": Module((Role.MLP_UP,), Layout.CONV1D),
        "mlp.c_proj": Module((Role.MLP_DOWN,), Layout.CONV1D),
        "ln_1": Module((Role.ATTN_NORM,), Layout.NORM),
        "ln_2": Module((Role.MLP_NORM,), Layout.NORM),
    },
    model_modules={
        "wte": Module((Role.EMBED,), Layout.EMBEDDING),
        "wpe": Module((Role.EMBED_POS,), Layout.EMBEDDING),
        "ln_f": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys={
        "hidden_size": ("n_embd", "hidden_size"),
        "num_layers": ("n_layer", "num_hidden_layers"),
        "num_heads": ("n_head", "num_attention_heads"),
        "intermediate_size": ("n_inner",),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
)
