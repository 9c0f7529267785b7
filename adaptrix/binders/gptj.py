"""GPT-J: separate q/k/v and out_proj, MLP fc_in / fc_out, one LayerNorm feeding both blocks."""

from adaptrix.binders.gpt2 import BINDER as GPT2
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="gptj",
    model_types=("gptj",),
    layer_container="h",
    # In the model's own module order, as PEFT walks them (combine's dare draws its masks in it).
    layer_modules={
        # Attention and MLP run in parallel on the same normalised input.
        "ln_1": Module((Role.ATTN_NORM,), Layout.NORM),
        "attn.k_proj": Module((Role.ATTN_K,)),
        "attn.v_proj": Module((Role.ATTN_V,)),
        "attn.q_proj": Module((Role.ATTN_Q,)),
        "attn.out_proj": Module((Role.ATTN_O,)),
        "mlp.fc_in": Module((Role.MLP_UP,)),
        "mlp.fc_out": Module((Role.MLP_DOWN,)),
    },
    model_modules={
        "wte": Module((Role.EMBED,), Layout.EMBEDDING),
        "ln_f": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
        "score": Module((Role.CLS_HEAD,)),
    },
    config_keys=GPT2.config_keys,
)
