"""Cohere (Command R): LLaMA's projections run in parallel on one LayerNorm (weight, no bias)."""

from adaptrix.binders.llama import ATTENTION, DECODER_CONFIG_KEYS, HEADS, MLP
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="cohere",
    model_types=("cohere",),
    layer_container="layers",
    # use_qk_norm's per-head q_norm / k_norm have no role.
    layer_modules={**ATTENTION, **MLP, "input_layernorm": Module((Role.ATTN_NORM,), Layout.NORM)},
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
    tie_default=True,
)
