"""DeBERTa-v2 / v3: BERT's post-LayerNorm layers with query_proj / key_proj / value_proj.

Relative-position parts have no role: encoder.rel_embeddings and encoder.LayerNorm, and with
share_att_key=False each layer's pos_key_proj / pos_query_proj. Nor do the embeddings a
variant may lack (position_embeddings: only with position_biased_input, which v3 turns off;
token_type_embeddings; embed_proj).
"""

from adaptrix.binders.bert import BINDER as BERT
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="deberta_v2",
    model_types=("deberta-v2",),
    layer_container="layer",
    layer_modules={
        "attention.self.query_proj": Module((Role.ATTN_Q,)),
        "attention.self.key_proj": Module((Role.ATTN_K,)),
        "attention.self.value_proj": Module((Role.ATTN_V,)),
        "attention.output.dense": Module((Role.ATTN_O,)),
        "attention.output.LayerNorm": Module((Role.ATTN_NORM,), Layout.NORM),
        "intermediate.dense": Module((Role.MLP_UP,)),
        "output.dense": Module((Role.MLP_DOWN,)),
        "output.LayerNorm": Module((Role.MLP_NORM,), Layout.NORM),
    },
    model_modules={
        "embeddings.word_embeddings": Module((Role.EMBED,), Layout.EMBEDDING),
        "embeddings.LayerNorm": Module((Role.EMBED_NORM,), Layout.NORM),
        "pooler.dense": Module((Role.POOLER,)),
        "classifier": Module((Role.CLS_HEAD,)),
    },
    config_keys=BERT.config_keys,
    tie_default=True,
)
