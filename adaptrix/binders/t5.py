"""T5 / mT5 / T5 v1.1: an encoder and a decoder stack; the decoder's layer.1 is the cross-attention.

T5 v1.1 and mT5 (feed_forward_proj "gated-gelu") replace DenseReluDense.wi by wi_0 (the gate, under
the activation) and wi_1 (the up projection): act(wi_0 x) * wi_1 x. The inner attention width is
num_heads * d_kv, which may differ from d_model. Each stack's relative_attention_bias (block 0 only)
and the encoder's final_layer_norm are left to the module-tree binder (module roles).
"""

from adaptrix.binders.table import Binder, Layout, Module, Stack
from adaptrix.ir.values import Role


def _attention(prefix: str, roles: tuple[Role, ...]) -> dict[str, Module]:
    return {f"{prefix}.{name}": Module((role,)) for name, role in zip("qkvo", roles, strict=True)}


def _mlp(block: int) -> dict[str, Module]:
    prefix = f"layer.{block}.DenseReluDense"
    return {  # the gated variant's order first: wi_1 and wi hold the same role, one model has one of them
        f"{prefix}.wi_0": Module((Role.MLP_GATE,)),
        f"{prefix}.wi_1": Module((Role.MLP_UP,)),
        f"{prefix}.wi": Module((Role.MLP_UP,)),
        f"{prefix}.wo": Module((Role.MLP_DOWN,)),
        f"layer.{block}.layer_norm": Module((Role.MLP_NORM,), Layout.NORM),
    }


def _gated(block: int) -> frozenset[str]:
    """The feed-forward modules one variant lacks (wi in the gated one, wi_0 / wi_1 in the other)."""
    return frozenset(f"layer.{block}.DenseReluDense.{name}" for name in ("wi", "wi_0", "wi_1"))


_SELF = {
    **_attention("layer.0.SelfAttention", (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O)),
    "layer.0.layer_norm": Module((Role.ATTN_NORM,), Layout.NORM),
}
_CROSS = {
    **_attention("layer.1.EncDecAttention", (Role.XATTN_Q, Role.XATTN_K, Role.XATTN_V, Role.XATTN_O)),
    "layer.1.layer_norm": Module((Role.XATTN_NORM,), Layout.NORM),
}
_DECODER_LAYERS = ("num_decoder_layers", "num_layers")  # None: as many as the encoder

BINDER = Binder(
    name="t5",
    model_types=("t5", "mt5"),
    layer_container="\0",
    layer_modules={},
    stacks=(
        Stack("encoder.block", ("num_layers",), {**_SELF, **_mlp(1)}, _gated(1)),
        Stack(
            "decoder.block", ("num_decoder_layers", "num_layers"), {**_SELF, **_CROSS, **_mlp(2)}, _gated(2)
        ),
    ),
    model_modules={
        "shared": Module((Role.EMBED,), Layout.EMBEDDING),
        "decoder.final_layer_norm": Module((Role.FINAL_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
    },
    config_keys={
        "hidden_size": ("d_model",),
        "num_heads": ("num_heads",),
        "head_dim": ("d_kv",),
        "intermediate_size": ("d_ff",),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
)
