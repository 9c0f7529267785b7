"""Merged output equals PEFT's forward for every family, plain LoRA and DoRA, fused modules included."""

import pytest
from builders import (
    FAMILIES,
    FP32_TOLERANCE,
    TRANSFORMERS_5,
    make_adapter,
    model_logits,
    peft_logits,
    sample_inputs,
)

from adaptrix import compile_adapter

# Their MLP targets reach transformers 5's packed experts, which PEFT wraps as parameters (no DoRA)
_DORA_REFUSED_5 = frozenset({"dots1", "ernie4_5_moe", "glm4_moe"})


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_matches_peft(family, use_dora, bases, tmp_path):
    if use_dora and TRANSFORMERS_5 and family in _DORA_REFUSED_5:
        pytest.skip("PEFT refuses DoRA on transformers 5's packed experts (lora.ParamWrapper)")
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter", use_dora=use_dora)
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    got = model_logits(family, out, inputs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    # The adapter must matter, or the comparison proves nothing.
    assert (model_logits(family, base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    assert (got - expected).abs().max() <= FP32_TOLERANCE


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "gpt2", "llama"])
def test_merge_in_many_row_blocks_matches_peft(family, bases, tmp_path, monkeypatch):
    """Tiny models fit one block; shrink blocks so every role (fused offsets too) spans several."""
    import adaptrix.lowering.merge_math as merge_math

    monkeypatch.setattr(merge_math, "_BLOCK_ELEMENTS", 100)
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter", use_dora=True)
    compile_adapter(adapter, base, "merged", tmp_path / "merged")
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    assert (model_logits(family, tmp_path / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE
