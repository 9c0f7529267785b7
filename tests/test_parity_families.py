"""Merged output equals PEFT's forward for every family, plain LoRA and DoRA, fused modules included."""

import pytest
from builders import FAMILIES, FP32_TOLERANCE, make_adapter, model_logits, peft_logits, sample_inputs

from adaptrix import compile_adapter


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_matches_peft(family, use_dora, bases, tmp_path):
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
