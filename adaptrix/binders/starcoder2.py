"""StarCoder2: q/k/v/o with biases, a plain MLP c_fc / c_proj, LayerNorms; embeddings tied by default."""

from adaptrix.binders.llama import ATTENTION, DECODER_CONFIG_KEYS, HEADS, NORMS
from adaptrix.binders.table import Binder, Module
from adaptrix.ir.values import Role

BINDER = Binder(
    name="starcoder2",
    model_types=("starcoder2",),
    layer_container="layers",
    layer_modules={
        **ATTENTION,
        "mlp.c_fc": Module((Role.MLP_UP,)),
        "mlp.c_proj": Module((Role.MLP_DOWN,)),
        **NORMS,
    },
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
    tie_default=True,
)
