"""StableLM: LLaMA's names with LayerNorms (weight and bias); optional per-head q / k LayerNorms."""

from adaptrix.binders.llama import BINDER as LLAMA
from adaptrix.binders.llama import DECODER_CONFIG_KEYS, HEADS
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="stablelm",
    model_types=("stablelm",),
    layer_container="layers",
    layer_modules=LLAMA.layer_modules,
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
    # use_parallel_residual (StableLM 2 12B): attention and MLP share input_layernorm.
    optional_modules=frozenset({"post_attention_layernorm"}),
)
