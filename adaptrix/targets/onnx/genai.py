"""genai_config.json: what onnxruntime-genai needs to run a decoder graph exported by optimum.

optimum's decoder graphs concatenate past and present key/values and take position_ids, so the
KV buffers cannot be shared (`past_present_share_buffer` false). Where every past key / value is
read by GroupQueryAttention alone and every present one is its output (lean.py's graphs), the
kernel appends in place to one buffer of `max_length` as in the builder's graphs: shared (true),
which saves copying the whole cache each step. onnxruntime-genai knows the Llama-family names as
model types; GPT-2 and GPT-NeoX graphs run as its generic "decoder".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from adaptrix.artifacts import GENAI_CONFIG
from adaptrix.io.checkpoint import Checkpoint

__all__ = ["GENAI_CONFIG", "shares_kv_buffers", "write_genai_config"]

logger = logging.getLogger(__name__)

_OWN_TYPES = {"llama", "mistral", "qwen2", "phi3"}
_PROVIDERS = {"onnx-cpu": [], "onnx-cuda": [{"cuda": {}}]}


def write_genai_config(
    base: Checkpoint, graph: onnx.GraphProto, out: Path, target: str, model_file: str
) -> str | None:
    """Write genai_config.json for a decoder graph; return its file name (None: not written)."""
    eos_ids = base.config.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if not eos_ids or any(not isinstance(e, int) or not 0 <= e < base.source.vocab_size for e in eos_ids):
        # onnxruntime-genai refuses such a file when it loads it; ORT and optimum do not need it.
        logger.warning("%s: eos_token_id %s is not a token of the vocabulary (%d): no %s written",
                       base.path / "config.json", base.config.get("eos_token_id"), base.source.vocab_size,
                       GENAI_CONFIG)  # fmt: skip
        return None
    inputs = {value.name: value for value in graph.input}
    past = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    source, config = base.source, base.config
    eos = config.get("eos_token_id")
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    pad, bos = config.get("pad_token_id"), config.get("bos_token_id")
    context = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    names = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
             "past_value_names": "past_key_values.%d.value"}  # fmt: skip
    names.update({name: name for name in ("attention_mask", "position_ids") if name in inputs})
    genai = {
        "model": {
            "bos_token_id": bos if bos is not None else first_eos,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else first_eos,
            "context_length": context,
            "vocab_size": source.vocab_size,
            "type": source.arch if source.arch in _OWN_TYPES else "decoder",
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": _PROVIDERS[target]},
                "filename": model_file,
                "head_size": past[3].dim_value,
                "hidden_size": source.hidden_size,
                "num_attention_heads": source.num_heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": past[1].dim_value,
                "inputs": names,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_kv_buffers(graph),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
        },
    }
    (out / GENAI_CONFIG).write_text(json.dumps(genai, indent=2, sort_keys=True) + "\n")
    return GENAI_CONFIG


def shares_kv_buffers(graph: onnx.GraphProto) -> bool:
    """Whether GroupQueryAttention alone reads each past key / value and writes each present one."""
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    past = {value.name for value in graph.input if value.name.startswith("past_key_values.")}
    present = {value.name for value in graph.output if value.name.startswith("present.")}
    if not attention or not past or len(past) != len(present):
        return False
    by_attention = {name for node in attention for name in node.input[3:5] if name}
    read_elsewhere = any(name in past for node in graph.node if node.op_type != "GroupQueryAttention"
                         for name in node.input)  # fmt: skip
    written = {name for node in attention for name in node.output[1:3] if name}
    return by_attention == past and not read_elsewhere and written == present
