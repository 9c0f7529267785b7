"""Mixtral, Qwen2-MoE, Qwen3-MoE: attention and norms as LLaMA's; the sparse MLP has no roles.

The router (`mlp.gate`, `block_sparse_moe.gate`), the experts (`...experts.N.gate_proj` or
`w1/w2/w3`) and Qwen2-MoE's shared expert are left to the module-tree binder: a role names one
weight per layer, and an expert is one of many.
"""

from adaptrix.binders.llama import ATTENTION, DECODER_CONFIG_KEYS, HEADS, NORMS
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="moe",
    model_types=("mixtral", "qwen2_moe", "qwen3_moe"),
    layer_container="layers",
    layer_modules={**ATTENTION, **NORMS},
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
)
