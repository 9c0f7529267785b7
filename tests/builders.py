"""Tiny seeded models of every family, PEFT adapters for them, and PEFT's reference forward."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

VOCAB = 128
FP32_TOLERANCE = 1e-4  # max |diff| of logits, merged vs PEFT, float32 (the bound)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one family and what LoRA usually targets there."""

    config: type
    model: type
    config_kwargs: dict
    targets: tuple[str, ...]
    encoder: bool = False


_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
)  # fmt: skip
_ENCODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
)  # fmt: skip
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        tf.GPT2Config, tf.GPT2LMHeadModel,
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
        ("c_attn", "c_proj", "c_fc"),
    ),
    "llama": Family(tf.LlamaConfig, tf.LlamaForCausalLM, _DECODER, _LLAMA_TARGETS),
    "mistral": Family(tf.MistralConfig, tf.MistralForCausalLM, _DECODER, _LLAMA_TARGETS),
    "qwen2": Family(tf.Qwen2Config, tf.Qwen2ForCausalLM, _DECODER, _LLAMA_TARGETS),
    "gpt_neox": Family(
        tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
        {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"},
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    "phi3": Family(
        tf.Phi3Config, tf.Phi3ForCausalLM,
        dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
    "bert": Family(
        tf.BertConfig, tf.BertForSequenceClassification, _ENCODER,
        ("query", "key", "value", "dense"), encoder=True,
    ),
    "roberta": Family(
        tf.RobertaConfig, tf.RobertaForSequenceClassification,
        dict(_ENCODER, pad_token_id=1), ("query", "key", "value", "dense"), encoder=True,
    ),
}  # fmt: skip


def build_base(
    family: str, path: Path, *, seed: int = 0, dtype=torch.float32, shard: str | None = None, **overrides
) -> Path:
    """Save a seeded random base of `family` into `path`."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    config = spec.config(**{**spec.config_kwargs, **overrides})
    model = spec.model(config).eval().to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def load_model(family: str, path: Path, dtype=torch.float32):
    """Load a saved model of `family` in eval mode."""
    return FAMILIES[family].model.from_pretrained(path, dtype=dtype).eval()


def make_adapter(
    family: str,
    base: Path,
    path: Path,
    *,
    seed: int = 1,
    safe: bool = True,
    save_embedding_layers: bool | str = "auto",
    **lora_kwargs,
) -> Path:
    """Make a PEFT LoRA adapter for `base` with non-zero weights and save it into `path`.

    Everything PEFT would train besides LoRA (biases, DoRA magnitudes, modules_to_save copies)
    is perturbed too, as training would, so that a compiler that ignored it would fail.
    """
    model = load_model(family, base)
    lora_kwargs.setdefault("target_modules", list(FAMILIES[family].targets))
    config = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **lora_kwargs})
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            is_lora = any(part in name for part in ("lora_A", "lora_B", "lora_embedding"))
            if param.requires_grad and not is_lora:
                noise = torch.randn(param.shape, generator=generator)
                param.mul_(1 + 0.2 * noise) if "magnitude" in name else param.add_(0.1 * noise)
    peft_model.save_pretrained(path, safe_serialization=safe, save_embedding_layers=save_embedding_layers)
    return path


def pair_of(adapters, family: str, **lora) -> tuple[Path, Path]:
    """Two LoRA adapters from conftest's `peft_adapters`: ranks 4 and 2 (full rank 6), `lora` on both."""
    return adapters(family, **lora), adapters(family, seed=5, r=2, lora_alpha=3, **lora)


def prompts_file(
    path: Path, count: int, *, length: int = 6, high: int = VOCAB, seed: int = 3
) -> torch.Tensor:
    """Seeded prompts [count, length] of ids 3..high-1, also written to `path` as JSON token-id lists."""
    prompts = torch.randint(3, high, (count, length), generator=torch.Generator().manual_seed(seed))
    path.write_text(json.dumps(prompts.tolist()))
    return prompts


def sample_inputs(family: str, seed: int = 2, batch: int = 2, length: int = 9) -> dict:
    """Seeded model inputs (token ids, and a mask and token types for encoders)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    if not FAMILIES[family].encoder:
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@torch.no_grad()
def peft_logits(family: str, base: Path, adapter: Path, inputs: dict) -> torch.Tensor:
    """The reference: PEFT's own forward with the adapter loaded from disk, unmerged."""
    model = PeftModel.from_pretrained(load_model(family, base), adapter).eval()
    return model(**inputs).logits


@torch.no_grad()
def model_logits(family: str, path: Path, inputs: dict, dtype=torch.float32) -> torch.Tensor:
    """Logits of a saved model directory, loaded with transformers."""
    return load_model(family, path, dtype)(**inputs).logits


ONNX_EXPORT_MISSING = 'ONNX export needs optimum-onnx: pip install "adaptrix[onnx]" (transformers < 4.58)'


def exports_onnx() -> bool:
    """Whether optimum's ONNX exporter (the `onnx` extra) is installed; the transformers 5 job has none."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ImportError:  # optimum itself is missing
        return False


def needs_onnx_export() -> None:
    """Skip the calling test or fixture where optimum's ONNX exporter is not installed."""
    if not exports_onnx():
        pytest.skip(ONNX_EXPORT_MISSING)
