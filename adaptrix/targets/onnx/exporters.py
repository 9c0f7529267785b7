"""Which exporter writes a base's ONNX graph, chosen from what is installed.

- `optimum` (optimum-onnx, which caps transformers below 4.58) where it imports and has a config
  for the family and task: the graphs of the seq2seq, encoder and decoder exports as before.
- `genai-builder`: onnxruntime-genai's model builder (it needs transformers 5) for the causal
  LMs it builds: GroupQueryAttention, packed QKV, fused norms, initializers named by module.
- `torch.onnx`: torch's TorchScript exporter for encoders and for the decoders neither of the
  above exports (MoE families among them). TorchScript, not dynamo: dynamo needs onnxscript,
  which neither environment installs, and the TorchScript graph names its nodes by module as
  optimum's does (optimum runs the same exporter), so the patcher reads both alike.

A seq2seq base without optimum is refused in one line. The choice is part of the export cache key
and of the artifact's manifest.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.onnx.tasks import CAUSAL_TASK, SEQ2SEQ_TASK, check_exportable, exported_tasks

__all__ = ["BUILDER", "BUILDER_ARCHITECTURES", "EXPORTERS", "EXPORT_FAILURES", "OPTIMUM", "TORCH",
           "choose_exporter", "export_failed", "exporter_versions", "has_builder", "has_optimum"]  # fmt: skip

logger = logging.getLogger(__name__)

OPTIMUM, BUILDER, TORCH = "optimum", "genai-builder", "torch.onnx"
EXPORTERS = (OPTIMUM, BUILDER, TORCH)
# The causal LMs the builder's dispatch builds as plain text decoders whose weights Adaptrix finds
# in its graph (builder_patch.py checks each found weight against the base's values).
# Each export is also checked against the model's PyTorch forward (torch_check.py): OLMo's was off.
BUILDER_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
})  # fmt: skip
# What a family's export raises from the model's own code or the tracer: the export is not supported
EXPORT_FAILURES = (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                   NotImplementedError)  # fmt: skip
_LIBRARIES = {OPTIMUM: ("optimum-onnx",), BUILDER: ("onnxruntime-genai", "onnx-ir"), TORCH: ()}
_TORCH_TASKS = frozenset({CAUSAL_TASK, "fill-mask", "text-classification", "feature-extraction"})


def export_failed(export: str, base: Checkpoint, exc: BaseException) -> UnsupportedError:
    """The one-line refusal of a base whose `export` ("torch.onnx's export") raised `exc`."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return UnsupportedError(
        f"{export} of this {base.config.get('model_type')} base failed "
        f"({type(exc).__name__}: {lines[0][:200]})",
        path=base.path,
        fix="use --target merged or --target hooks for this base",
    )


def has_optimum() -> bool:
    """Whether optimum's ONNX exporter imports here (the `onnx` extra, transformers < 4.58)."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ImportError:  # no optimum at all: find_spec imports the parent packages
        return False


def has_builder() -> bool:
    """Whether onnxruntime-genai's model builder can run here (it needs transformers 5 and onnx-ir).

    Found without importing it: its package puts its own folder on sys.path.
    """
    if int(version("transformers").split(".")[0]) < 5:
        return False
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("onnx_ir") is None:
        return False
    return any((Path(p) / "models" / "builder.py").is_file() for p in spec.submodule_search_locations)


def choose_exporter(base: Checkpoint, task: str) -> str:
    """The exporter for `base` exported for `task`, or a one-line refusal naming what to install."""
    family = str(base.config.get("model_type"))
    if has_optimum() and task in (exported_tasks(family) or ()):
        return OPTIMUM
    if task == SEQ2SEQ_TASK:
        if has_optimum():
            check_exportable(base, task)  # optimum's own refusal for the family
        raise UnsupportedError(
            f"ONNX for encoder-decoders ({family}) is exported by optimum-onnx, which is not installed"
            f" (transformers {version('transformers')} is)",
            path=base.path,
            fix='pip install "adaptrix[onnx]" (it needs transformers < 4.58), or --target merged or hooks',
        )
    architectures = set(base.config.get("architectures") or [])
    builds = architectures & BUILDER_ARCHITECTURES and _gqa_heads(base) and _one_vocab_wide(base)
    if task == CAUSAL_TASK and has_builder() and builds:
        return BUILDER
    if task in _TORCH_TASKS:
        return TORCH
    raise UnsupportedError(
        f"no ONNX exporter here has a {task} export for the {family} family",
        path=base.path,
        fix="use --target merged or --target hooks for this base",
    )


def _one_vocab_wide(base: Checkpoint) -> bool:
    """Whether only the LM head has vocab_size outputs: the builder takes any such Linear for the head.

    With an MLP as wide as the vocabulary (intermediate_size == vocab_size) it wires its head to
    layer 0's projections and its graph fails the check against the forward: torch.onnx exports it.
    """
    config = base.config
    heads, head = _heads(config)
    kv = config.get("num_key_value_heads") or heads
    widths = {config.get("hidden_size"), config.get("intermediate_size"), heads * head, kv * head}
    return config.get("vocab_size") not in widths


def _gqa_heads(base: Checkpoint) -> bool:
    """Whether onnxruntime's GroupQueryAttention runs the base's heads (CPU kernel: head size % 16 == 0)."""
    head = _heads(base.config)[1]
    return bool(head) and head % 16 == 0


def _heads(config: dict) -> tuple[int, int]:
    """(attention heads, head size) of a config: its head_dim, else hidden_size / heads."""
    heads = max(config.get("num_attention_heads", 1), 1)
    return heads, config.get("head_dim") or config.get("hidden_size", 0) // heads


def exporter_versions(exporter: str) -> dict[str, str]:
    """The versions of the libraries whose output the exporter's graph depends on (the cache key)."""
    found = {}
    for name in ("torch", "transformers", "onnx", *_LIBRARIES[exporter]):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found
