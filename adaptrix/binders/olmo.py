"""OLMo: LLaMA's projections; its LayerNorms are non-parametric (no weight), so no norm has a role."""

from adaptrix.binders.llama import ATTENTION, DECODER_CONFIG_KEYS, MLP
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.ir.values import Role

HEADS = {
    "embed_tokens": Module((Role.EMBED,), Layout.EMBEDDING),
    "lm_head": Module((Role.LM_HEAD,)),
    "score": Module((Role.CLS_HEAD,)),
}

BINDER = Binder(
    name="olmo",
    model_types=("olmo",),
    layer_container="layers",
    layer_modules={**ATTENTION, **MLP},
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
)
