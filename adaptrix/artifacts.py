"""The artifacts' file names and format tags, in one place.

Standard library only: the compiler (targets, api) writes these names and the serving-time
runtimes (`adaptrix.runtimes.hooks`, `adaptrix.runtimes.onnx`) read them, so both import this
module and nothing else of each other.
"""

from __future__ import annotations

import re

__all__ = [
    "ACTIVATION_NAMES",
    "ADAPTERS_DIR",
    "ADAPTER_SUFFIX",
    "ADAPTRIX_VERSION",
    "AIR_FORMAT",
    "BOTTLENECK_FORMAT",
    "BUNDLE_FORMAT",
    "DATA_NAME",
    "GENAI_CONFIG",
    "GGUF_LORA_SUFFIX",
    "GGUF_MODEL",
    "IDENTITY",
    "KINDS_FORMAT",
    "MANIFEST_NAME",
    "MODEL_NAME",
    "ONNX_TARGETS",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "TENSORS_FILE",
    "find_module",
    "probe_indices",
    "renamed",
]

# Every artifact
ADAPTRIX_VERSION = "0.1.0"  # recorded in every manifest; pyproject.toml has the same
MANIFEST_NAME = "manifest.json"

# Hooks bundles
TENSORS_FILE = "bundle.safetensors"
BUNDLE_FORMAT = 1
KINDS_FORMAT = 2  # a bundle with dense or scale entries: a reader of format 1 must refuse it
BOTTLENECK_FORMAT = 3  # a bundle with bottleneck entries: readers of formats 1 and 2 must refuse it
IDENTITY = "linear"  # a bottleneck's activation that computes nothing
# The activations a bottleneck may use, as AdapterHub names them (transformers' ACT2FN)
ACTIVATION_NAMES = frozenset({
    "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu", "swish", "tanh",
    "sigmoid", "leakyrelu", "leaky_relu", "relu6", "mish", IDENTITY,
})  # fmt: skip

# ONNX artifacts
ONNX_TARGETS = ("onnx-cpu", "onnx-cuda")
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx_data"
GENAI_CONFIG = "genai_config.json"

# GGUF artifacts (llama.cpp): the model, and with --unmerged one LoRA file per adapter beside it
GGUF_MODEL = "model.gguf"
GGUF_LORA_SUFFIX = ".lora.gguf"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"

# AIR files: the safetensors metadata's `format` (the rest of the container: adaptrix.io.air_format)
AIR_FORMAT = "adaptrix-air"

# PEFT adapter directories (read by the PEFT frontend, written by the peft target)
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


_PROBES = 8  # elements a bundle's or an ONNX patch's probe samples from a base weight


def probe_indices(numel: int) -> list[int]:
    """Flat indices of the elements a probe samples from a weight of `numel` elements."""
    if numel <= _PROBES:
        return list(range(numel))
    return sorted({(k * numel) // _PROBES + (k * 7919) % max(1, numel // _PROBES) for k in range(_PROBES)})


# Checkpoint module names that transformers 5 loads under another name (its checkpoint conversion
# mapping); checkpoints, and so artifacts, keep the stored name.
_RENAMED_ON_LOAD = {"embed_out": "lm_head"}  # GPT-NeoX's head


def _loaded_name(model, name: str) -> str:
    """A checkpoint's module name as the model has it in memory: its class's conversion mapping.

    Some classes (Gemma 3n's) load checkpoints under other names; transformers keeps the
    patterns on the class (`_checkpoint_conversion_mapping`, library code, not input).
    """
    return renamed(name, (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items())


def renamed(name: str, patterns) -> str:
    """`name` rewritten by the first (regex, replacement) of `patterns` that matches it, else unchanged.

    That is how transformers applies a class's checkpoint conversion mapping.
    """
    for pattern, replacement in patterns:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name


def find_module(model, name: str, modules: dict | None = None):
    """A module by its checkpoint name, with or without the model's base prefix (`model.`, `bert.`).

    Where the model has no such module, the name transformers 5 loads it under (GPT-NeoX's
    `embed_out` is its `lm_head`).
    """
    modules = dict(model.named_modules()) if modules is None else modules
    if name not in modules and name in _RENAMED_ON_LOAD:
        name = _RENAMED_ON_LOAD[name]
    if name not in modules:
        name = _loaded_name(model, name)
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    return next((modules[c] for c in candidates if c in modules), None)
