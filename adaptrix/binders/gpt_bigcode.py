"""GPTBigCode (StarCoder, SantaCoder): GPT-2's names with nn.Linear; `c_attn` fuses q, k, v per kv group.

multi_query (the default): one kv head, c_attn is q | k | v in blocks; without it, per head
q, k, v, each head_dim rows. The `grouped` split is both.
"""

from adaptrix.binders.gpt2 import BINDER as GPT2
from adaptrix.binders.table import Binder, Layout, Module, MultiQuery, Split
from adaptrix.ir.values import Role

GROUPED = Split("grouped", ("q", "k", "v"))

BINDER = Binder(
    name="gpt_bigcode",
    model_types=("gpt_bigcode",),
    layer_container="h",
    layer_modules={  # in the model's own module order
        "ln_1": Module((Role.ATTN_NORM,), Layout.NORM),
        "attn.c_attn": Module((Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V), split=GROUPED),
        "attn.c_proj": Module((Role.ATTN_O,)),
        "ln_2": Module((Role.MLP_NORM,), Layout.NORM),
        "mlp.c_fc": Module((Role.MLP_UP,)),
        "mlp.c_proj": Module((Role.MLP_DOWN,)),
    },
    model_modules=GPT2.model_modules,
    config_keys=GPT2.config_keys,
    tie_default=True,
    multi_query=MultiQuery("multi_query", default=True),
)
