"""Gemma: LLaMA's module names and pre-norms (RMSNorm scales by 1 + weight); embeddings tied by default."""

from adaptrix.binders.llama import BINDER as LLAMA
from adaptrix.binders.llama import DECODER_CONFIG_KEYS, HEADS
from adaptrix.binders.table import Binder

BINDER = Binder(
    name="gemma",
    model_types=("gemma",),
    layer_container="layers",
    layer_modules=LLAMA.layer_modules,
    model_modules=HEADS,
    config_keys=DECODER_CONFIG_KEYS,  # head_dim is its own key: Gemma 7B's is not hidden / heads
    tie_default=True,
    bottleneck_points=LLAMA.bottleneck_points,
)
