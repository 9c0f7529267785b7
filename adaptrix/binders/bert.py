"""BERT / RoBERTa encoders: separate query, key, value; post-attention and post-FFN LayerNorms."""

from adaptrix.binders.table import Binder, BlockPoints, Layout, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="bert",
    model_types=("bert", "roberta"),
    layer_container="layer",
    layer_modules={
        "attention.self.query": Module((Role.ATTN_Q,)),
        "attention.self.key": Module((Role.ATTN_K,)),
        "attention.self.value": Module((Role.ATTN_V,)),
        "attention.output.dense": Module((Role.ATTN_O,)),
        "attention.output.LayerNorm": Module((Role.ATTN_NORM,), Layout.NORM),
        "intermediate.dense": Module((Role.MLP_UP,)),
        "output.dense": Module((Role.MLP_DOWN,)),
        "output.LayerNorm": Module((Role.MLP_NORM,), Layout.NORM),
    },
    model_modules={
        "embeddings.word_embeddings": Module((Role.EMBED,), Layout.EMBEDDING),
        "embeddings.position_embeddings": Module((Role.EMBED_POS,), Layout.EMBEDDING),
        "embeddings.token_type_embeddings": Module((Role.EMBED_TYPE,), Layout.EMBEDDING),
        "embeddings.LayerNorm": Module((Role.EMBED_NORM,), Layout.NORM),
        "pooler.dense": Module((Role.POOLER,)),
        "classifier.dense": Module((Role.CLS_DENSE,)),
        "classifier.out_proj": Module((Role.CLS_HEAD,)),
        "classifier": Module((Role.CLS_HEAD,)),
    },
    config_keys={
        "hidden_size": ("hidden_size",),
        "num_layers": ("num_hidden_layers",),
        "num_heads": ("num_attention_heads",),
        "intermediate_size": ("intermediate_size",),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
    # BertSelfOutput / BertOutput: forward(x, r) = LayerNorm(dropout(dense(x)) + r).
    bottleneck_points={
        "attn": BlockPoints(
            "attention.output",
            "attention.output.dropout",
            "attention.output",
            1,
            "attention.output.dense",
            "attention.output.LayerNorm",
        ),
        "mlp": BlockPoints("output", "output.dropout", "output", 1, "output.dense", "output.LayerNorm"),
    },
)
