"""SmolLM3: LLaMA's names and layout (some layers skip RoPE); embeddings tied by default."""

from adaptrix.binders.llama import BINDER as LLAMA
from adaptrix.binders.llama import DECODER_CONFIG_KEYS, HEADS
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="smollm3",
    model_types=("smollm3",),
    layer_container="layers",
    layer_modules=LLAMA.layer_modules,
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,
    tie_default=True,
)
