"""ModernBERT: `Wqkv` fuses q, k, v in blocks; `Wi` fuses the MLP's two input halves.

Wi's output is (input | gate) and the MLP computes Wo(act(input) * gate): ModernBERT's `input`
is the activated half, LLaMA's gate_proj (MLP_GATE), and its `gate` is LLaMA's up_proj (MLP_UP).
Layer 0 has no attn_norm (an Identity: the embeddings end with a norm). head.norm has no role.
"""

from adaptrix.binders.bert import BINDER as BERT
from adaptrix.binders.table import Binder, Layout, Module, Split
from adaptrix.ir.values import Role

BINDER = Binder(
    name="modernbert",
    model_types=("modernbert",),
    layer_container="layers",
    layer_modules={
        "attn_norm": Module((Role.ATTN_NORM,), Layout.NORM),
        "attn.Wqkv": Module(
            (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V), split=Split("blocked", ("q_size", "kv_size", "kv_size"))
        ),
        "attn.Wo": Module((Role.ATTN_O,)),
        "mlp_norm": Module((Role.MLP_NORM,), Layout.NORM),
        "mlp.Wi": Module(
            (Role.MLP_GATE, Role.MLP_UP), split=Split("blocked", ("intermediate_size", "intermediate_size"))
        ),
        "mlp.Wo": Module((Role.MLP_DOWN,)),
    },
    model_modules={
        "embeddings.tok_embeddings": Module((Role.EMBED,), Layout.EMBEDDING),
        "embeddings.norm": Module((Role.EMBED_NORM,), Layout.NORM),
        "final_norm": Module((Role.FINAL_NORM,), Layout.NORM),
        "head.dense": Module((Role.CLS_DENSE,)),
        "classifier": Module((Role.CLS_HEAD,)),
        "decoder": Module((Role.LM_HEAD,)),
    },
    config_keys=BERT.config_keys,
    tie_default=True,
    lm_head_weight="decoder.weight",
    optional_modules=frozenset({"attn_norm"}),
)
