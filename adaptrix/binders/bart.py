"""BART: an encoder and a decoder stack of separate q / k / v projections; post-norm residuals.

The decoder's encoder_attn is the cross-attention. Learned positions (embed_positions) hold
max_position_embeddings + 2 rows (BART's offset); final_logits_bias is a buffer, not a module.
The encoder's embed_positions and layernorm_embedding are left to the module-tree binder.
"""

from adaptrix.binders.table import Binder, Layout, Module, Stack
from adaptrix.ir.values import Role


def _attention(prefix: str, roles: tuple[Role, ...], norm: Role) -> dict[str, Module]:
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    table = {f"{prefix}.{name}": Module((role,)) for name, role in zip(names, roles, strict=True)}
    return {**table, f"{prefix}_layer_norm": Module((norm,), Layout.NORM)}


_SELF = _attention("self_attn", (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O), Role.ATTN_NORM)
_CROSS = _attention("encoder_attn", (Role.XATTN_Q, Role.XATTN_K, Role.XATTN_V, Role.XATTN_O), Role.XATTN_NORM)
_MLP = {
    "fc1": Module((Role.MLP_UP,)),
    "fc2": Module((Role.MLP_DOWN,)),
    "final_layer_norm": Module((Role.MLP_NORM,), Layout.NORM),
}

BINDER = Binder(
    name="bart",
    model_types=("bart",),
    layer_container="\0",
    layer_modules={},
    stacks=(
        Stack("encoder.layers", ("encoder_layers",), {**_SELF, **_MLP}),
        Stack("decoder.layers", ("decoder_layers",), {**_SELF, **_CROSS, **_MLP}),
    ),
    model_modules={
        "shared": Module((Role.EMBED,), Layout.EMBEDDING),
        "decoder.embed_positions": Module((Role.EMBED_POS,), Layout.EMBEDDING),
        "decoder.layernorm_embedding": Module((Role.EMBED_NORM,), Layout.NORM),
        "lm_head": Module((Role.LM_HEAD,)),
    },
    config_keys={
        "hidden_size": ("d_model",),
        "num_heads": ("encoder_attention_heads",),
        "intermediate_size": ("encoder_ffn_dim",),
        "vocab_size": ("vocab_size",),
    },
    tie_default=True,
    # one intermediate size and one head count: a config whose decoder differs is read from its tree
    same_sizes=(
        ("encoder_ffn_dim", "decoder_ffn_dim"),
        ("encoder_attention_heads", "decoder_attention_heads"),
    ),
)
