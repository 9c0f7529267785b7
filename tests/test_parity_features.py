"""Every LoRA feature PEFT writes compiles to what PEFT computes (merged target, float32)."""

import json

import pytest
from builders import FP32_TOLERANCE, TRANSFORMERS_5, make_adapter, model_logits, peft_logits, sample_inputs

from adaptrix import compile_adapter

# (case id, family, base variant overrides, LoraConfig keyword arguments)
# GPT-NeoX's head: `embed_out` in its checkpoints and to transformers 4; transformers 5 loads it as `lm_head`.
NEOX_HEAD = "lm_head" if TRANSFORMERS_5 else "embed_out"

FEATURES = [
    ("rslora", "llama", {}, dict(use_rslora=True, r=8, lora_alpha=4)),
    (
        "rank-and-alpha-pattern",
        "llama",
        {},
        dict(rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32}),
    ),
    ("layers-to-transform", "llama", {}, dict(layers_to_transform=[1], layers_pattern="layers")),
    ("layers-to-transform-int", "gpt_neox", {}, dict(layers_to_transform=0)),
    ("regex-targets", "llama", {}, dict(target_modules=r".*\.(q_proj|v_proj|down_proj)")),
    ("all-linear", "llama", {}, dict(target_modules="all-linear")),
    ("all-linear-fused", "phi3", {}, dict(target_modules="all-linear")),
    ("exclude-modules", "llama", {}, dict(exclude_modules=["k_proj", "up_proj"])),
    ("fan-in-fan-out", "gpt2", {}, dict(fan_in_fan_out=True)),
    ("bias-all", "gpt2", {}, dict(bias="all")),
    ("bias-lora-only", "qwen2", {}, dict(bias="lora_only")),
    ("lora-bias", "gpt2", {}, dict(lora_bias=True, target_modules=["c_attn", "c_fc"])),
    ("modules-to-save-head", "llama", {}, dict(modules_to_save=["lm_head"])),
    ("modules-to-save-norm", "gpt2", {}, dict(modules_to_save=["ln_f"])),
    ("modules-to-save-classifier", "bert", {}, dict(modules_to_save=["classifier"])),
    ("bias-all-with-modules-to-save", "gpt2", {}, dict(bias="all", modules_to_save=["ln_f"])),
    ("modules-to-save-roberta-head", "roberta", {}, dict(modules_to_save=["classifier"])),
    ("embedding-and-head", "llama", {}, dict(target_modules=["embed_tokens", "lm_head", "q_proj"])),
    (
        "embedding-and-head-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["embed_tokens", "lm_head", "q_proj"]),
    ),
    ("head-only-tied", "gpt2", {}, dict(target_modules=["lm_head"])),
    ("embedding-only-tied", "gpt2", {}, dict(target_modules=["wte", "c_attn"])),
    ("embedding-neox-untied", "gpt_neox", {}, dict(target_modules=["embed_in", NEOX_HEAD])),
    ("dora-rslora-pattern", "phi3", {}, dict(use_dora=True, use_rslora=True, rank_pattern={"qkv_proj": 6})),
    ("dora-conv1d-bias-all", "gpt2", {}, dict(use_dora=True, bias="all")),
    ("bert-embeddings", "bert", {}, dict(target_modules=["word_embeddings", "query", "value"])),
    ("dora-embedding", "llama", {}, dict(use_dora=True, target_modules=["embed_tokens", "q_proj"])),
    ("dora-embedding-tied", "gpt2", {}, dict(use_dora=True, target_modules=["wte", "lm_head", "c_attn"])),
]


CASES = [case[1:] for case in FEATURES]


@pytest.mark.parametrize(("family", "variant", "lora"), CASES, ids=[case[0] for case in FEATURES])
def test_feature_matches_peft(family, variant, lora, bases, tmp_path):
    base = bases(family, json.dumps(variant, sort_keys=True), **variant)
    adapter = make_adapter(family, base, tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    got = model_logits(family, out, inputs)
    assert (model_logits(family, base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= FP32_TOLERANCE


def test_tied_head_is_untied_in_output(bases, tmp_path):
    """LoRA on a tied lm_head changes the head only: the output must stop tying it to the embedding."""
    base = bases("gpt2")
    adapter = make_adapter("gpt2", base, tmp_path / "adapter", target_modules=["lm_head"])
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    base_config = json.loads((base / "config.json").read_text())
    assert base_config.get("tie_word_embeddings", True) is True
