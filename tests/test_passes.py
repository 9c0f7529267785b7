"""Passes: fold-blend, combine and reduce-rank are exact where they should be, lossy as Eckart-Young says."""

import json

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, sample_inputs
from pass_builders import assert_pass_option_refused, bias_pair, compiled_logits, pass_records
from peft import PeftModel
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter, load
from adaptrix.cli import app
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import LowRank
from adaptrix.passes import PASSES, Pass, register
from adaptrix.passes.reduce_rank import ReduceRankOptions, reduce_rank

runner = CliRunner()


@torch.no_grad()
def reference_logits(base, parts, inputs, family="llama"):
    """Logits of base + sum(coeff * (PEFT-merged parameters - base parameters)), built by hand."""
    model = load_model(family, base)
    original = {key: value.clone() for key, value in model.state_dict().items()}
    blended = {key: value.clone() for key, value in original.items()}
    for adapter, coeff in parts:
        merged = PeftModel.from_pretrained(load_model(family, base), adapter).merge_and_unload().state_dict()
        for key, value in blended.items():
            value += coeff * (merged[key] - original[key])
    model.load_state_dict(blended)
    return model(**inputs).logits


def test_fold_blend_is_exact(lora_pair, tmp_path):
    base, first, _ = lora_pair
    got = compiled_logits(first, base, tmp_path / "out", ["fold-blend:alpha=0.3"])
    expected = reference_logits(base, [(first, 0.3)], sample_inputs("llama"))
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    [record] = pass_records(tmp_path / "out")
    assert record["name"] == "fold-blend" and record["options"] == {"alpha": 0.3} and record["changed"]
    assert "layer 0 attn_q" in record["report"]["sites"]


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_combine_is_the_exact_weighted_sum_with_mixed_ranks(lora_pair, tmp_path, method):
    base, first, second = lora_pair
    spec = f"combine:method={method},weights=0.7,-0.4"
    got = compiled_logits([first, second], base, tmp_path / "out", [spec])
    expected = reference_logits(base, [(first, 0.7), (second, -0.4)], sample_inputs("llama"))
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    [record] = manifest["passes"]
    assert record["options"] == {"method": method, "weights": [0.7, -0.4], "rank": None, "density": None,
                                 "seed": None, "majority_sign_method": None}  # fmt: skip
    assert {entry["rank"] for entry in record["report"]["sites"]} == {6}
    assert set(manifest["inputs"]) == {"adapter", "adapter.2", "base"}


def test_combine_svd_at_full_rank_and_reduce_rank_at_full_rank_are_exact(lora_pair, tmp_path):
    base, first, second = lora_pair
    passes = ["combine:method=svd,weights=1,1,rank=6", "reduce-rank:rank=6"]
    got = compiled_logits([first, second], base, tmp_path / "out", passes)
    expected = reference_logits(base, [(first, 1.0), (second, 1.0)], sample_inputs("llama"))
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [record["name"] for record in manifest["passes"]] == ["combine", "reduce-rank"]
    assert manifest["passes"][1]["report"]["max_relative_error"] < 1e-6


def test_reduce_rank_meets_the_eckart_young_bound(lora_pair):
    base, first, _ = lora_pair
    ir = load(first, base)
    result = reduce_rank(ir, ReduceRankOptions(rank=2))
    assert result.changed
    for (site, before), (_, after), entry in zip(ir, result.ir, result.report["sites"], strict=True):
        assert entry["site"] == str(site) and entry["rank_after"] == 2 and isinstance(after, LowRank)
        dense = before.delta().double()
        values = torch.linalg.svdvals(dense)
        bound = float(values[2:].square().sum().sqrt() / dense.norm())
        actual = float((after.delta().double() - dense).norm() / dense.norm())
        assert abs(entry["relative_error"] - bound) < 1e-5 and abs(actual - bound) < 1e-5
        assert abs(entry["energy_kept"] - float(values[:2].square().sum() / values.square().sum())) < 1e-6
    by_energy = reduce_rank(ir, ReduceRankOptions(energy=0.9)).report["sites"]
    assert all(entry["energy_kept"] >= 0.9 - 1e-9 for entry in by_energy)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("fold-blend:alpha=abc", "pass fold-blend: option alpha='abc' is not a single number"),
        ("fold-blend:alpha=nan", "option alpha='nan' is not a single number"),
        ("fold-blend:beta=1", "pass fold-blend: unknown option 'beta'"),
        ("fold-blend", "pass fold-blend: option alpha is required"),
        ("reduce-rank:rank=0", "pass reduce-rank: option rank=0 must be at least 1"),
        ("reduce-rank:rank=2,energy=0.5", "give exactly one of the options rank and energy"),
        ("combine:method=mean", "pass combine: option method='mean' is not one of"),
        ("combine:weights=1,x", "option weights='1,x' is not a comma-separated list of numbers"),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_pass_and_option(lora_pair, tmp_path, spec, words):
    base, first, _ = lora_pair
    assert_pass_option_refused(["compile", first, "--base", base, "--pass", spec], tmp_path / "o", words)


def test_pass_that_does_not_fit_the_ir_fails_with_pass_and_counts(lora_pair, tmp_path):
    base, first, second = lora_pair
    with pytest.raises(BadInputError, match="pass combine: option weights has 1 values for 2 adapters"):
        compile_adapter([first, second], base, "merged", tmp_path / "a", passes=["combine:weights=1"])
    with pytest.raises(BadInputError, match="pass combine: needs two adapters"):
        compile_adapter(first, base, "merged", tmp_path / "b", passes=["combine"])
    with pytest.raises(BadInputError, match="takes one adapter, 2 were given"):
        compile_adapter([first, second], base, "merged", tmp_path / "c", passes=["fold-blend:alpha=1"])


def test_fold_blend_refuses_dora_naming_the_site(bases, peft_adapters, tmp_path):
    base = bases("llama")
    adapter = peft_adapters("llama", use_dora=True, target_modules=["q_proj"])
    with pytest.raises(UnsupportedError, match=r"^pass fold-blend: layer 0 attn_q: a DoRA op is not linear"):
        compile_adapter(adapter, base, "merged", tmp_path / "out", passes=["fold-blend:alpha=0.5"])


@pytest.mark.parametrize("spec", ["fold-blend:alpha=1.7", "combine:weights=0.6,0.9"])
def test_bias_deltas_blend_and_combine_exactly_on_gpt2(bases, peft_adapters, tmp_path, spec):
    base = bases("gpt2")
    first, second = bias_pair(peft_adapters)
    adapters, parts = (
        ([first], [(first, 1.7)]) if "fold" in spec else ([first, second], [(first, 0.6), (second, 0.9)])
    )
    got = compiled_logits(adapters, base, tmp_path / "out", [spec], family="gpt2")
    expected = reference_logits(base, parts, sample_inputs("gpt2"), family="gpt2")
    assert (got - expected).abs().max() <= FP32_TOLERANCE


def test_registry_lists_passes_and_refuses_a_name_twice():
    listed = runner.invoke(app, ["passes"])
    assert listed.exit_code == 0 and all(name in listed.stdout for name in PASSES)
    spec = PASSES["fold-blend"]
    with pytest.raises(ValueError, match="registered twice"):
        register(spec, Pass(spec.name, "again", spec.options, spec.run))
