"""Gemma, Gemma 2, Gemma 3 (text): LLaMA's projections; embeddings tied by default; norms without roles.

Gemma's RMSNorm scales by (1 + weight), not by weight: a pass that reads a norm's weight as its
gain (project) would misread it, so no norm has a role. Gemma 2 and 3 have four norms per layer
(input_layernorm and pre_feedforward_layernorm before each block, post_attention_layernorm and
post_feedforward_layernorm after it), Gemma 3 per-head q_norm / k_norm too.
"""

from adaptrix.binders.llama import ATTENTION, DECODER_CONFIG_KEYS, MLP
from adaptrix.binders.olmo import HEADS
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    layer_container="layers",
    layer_modules={**ATTENTION, **MLP},
    model_modules=HEADS,  # no final norm either
    config_keys=DECODER_CONFIG_KEYS,  # head_dim is its own key: Gemma 7B's is not hidden / heads
    tie_default=True,
)
