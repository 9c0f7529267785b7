"""Granite: LLaMA's names and layout; block outputs are scaled by residual_multiplier before the add."""

from adaptrix.binders.llama import BINDER as LLAMA
from adaptrix.binders.llama import DECODER_CONFIG_KEYS, HEADS
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="granite",
    model_types=("granite",),
    layer_container="layers",
    layer_modules=LLAMA.layer_modules,
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
)
