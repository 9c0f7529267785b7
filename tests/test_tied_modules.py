"""A LoRA on a module whose weight is tied to another's: LUKE's entity head and its entity embeddings.

PEFT's forward adapts the head alone; its merge_and_unload writes the delta into the shared weight,
so the entity embeddings change too (PEFT merged and unmerged differ wherever entities are given).
Hooks compute PEFT's forward; merged is refused in one line, as no checkpoint can hold it (the
class ties the two again on load). Also: PEFT's target_parameters on a plain Linear weight.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

import adaptrix
from adaptrix.ir.errors import UnsupportedError

TOLERANCE = 1e-4
_CONFIG = dict(vocab_size=128, entity_vocab_size=64, hidden_size=32, entity_emb_size=16, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip


@pytest.fixture(scope="module")
def luke(tmp_path_factory):
    """A tiny LUKE masked LM, an all-linear LoRA (the entity head included), inputs with entities."""
    root = tmp_path_factory.mktemp("luke")
    torch.manual_seed(0)
    tf.LukeForMaskedLM(tf.LukeConfig(**_CONFIG)).eval().save_pretrained(root / "base")
    torch.manual_seed(1)
    config = LoraConfig(target_modules="all-linear", init_lora_weights=False, r=4, lora_alpha=8)
    model = tf.LukeForMaskedLM.from_pretrained(root / "base")
    get_peft_model(model, config).save_pretrained(root / "adapter")
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "input_ids": torch.randint(3, 128, (2, 8), generator=generator),
        "entity_ids": torch.randint(1, 64, (2, 3), generator=generator),
        "entity_attention_mask": torch.ones(2, 3, dtype=torch.long),
        "entity_position_ids": torch.arange(3).repeat(2, 1)[..., None],
    }
    return root / "base", root / "adapter", inputs


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


def test_hooks_adapt_the_tied_entity_head_as_peft_forward_does(luke, tmp_path):
    base, adapter, inputs = luke
    assert "entity_predictions.decoder" in (adapter / "adapter_config.json").read_text()
    peft_model = PeftModel.from_pretrained(tf.LukeForMaskedLM.from_pretrained(base), adapter)
    expected = _logits(peft_model, inputs)
    merged_by_peft = _logits(peft_model.merge_and_unload(), inputs)
    assert (merged_by_peft - expected).abs().max() > 100 * TOLERANCE  # its merge changes the embeddings too
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    model = tf.LukeForMaskedLM.from_pretrained(base)
    adaptrix.attach(model, tmp_path / "bundle")
    assert (_logits(model, inputs) - expected).abs().max() <= TOLERANCE


def test_merged_refuses_a_delta_on_a_tied_module_in_one_line(luke, tmp_path):
    base, adapter, _ = luke
    with pytest.raises(UnsupportedError) as caught:
        adaptrix.compile_adapter(adapter, base, "merged", tmp_path / "merged")
    assert "\n" not in str(caught.value) and "entity_predictions.decoder" in str(caught.value)
    assert "--target hooks" in str(caught.value) and not (tmp_path / "merged").exists()


def test_target_parameters_on_a_linear_weight_is_a_linear_lora(bases, tmp_path):
    """PEFT's ParamWrapper on a 2-D weight (target_parameters, no target_modules) computes a Linear's LoRA."""
    from builders import FP32_TOLERANCE, make_adapter, model_logits, peft_logits, sample_inputs

    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter", target_modules=[],
                           target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])  # fmt: skip
    adaptrix.compile_adapter(adapter, base, "merged", tmp_path / "merged")
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapter, inputs)
    assert (model_logits("llama", base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    assert (model_logits("llama", tmp_path / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE
