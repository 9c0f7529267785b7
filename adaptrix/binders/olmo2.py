"""OLMo 2: LLaMA's projections, but norms only after each block (and q_norm / k_norm over all heads).

post_attention_layernorm and post_feedforward_layernorm normalise a block's output before the
residual add; nothing normalises a block's input, so ATTN_NORM / MLP_NORM (a block's input
scale, as passes read it) name nothing here. The final norm does feed the head.
"""

from adaptrix.binders.llama import ATTENTION, DECODER_CONFIG_KEYS, HEADS, MLP
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="olmo2",
    model_types=("olmo2",),
    layer_container="layers",
    layer_modules={**ATTENTION, **MLP},
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
)
