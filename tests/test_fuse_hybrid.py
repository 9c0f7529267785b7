"""fuse-hybrid: a PEFT LoRA and an AdapterHub bottleneck compiled as one, equal to both libraries.

The reference is PEFT's LoRA merged into the base (merge_and_unload), with the AdapterHub adapter
then loaded and active on that merged model: AdapterHub's own forward, float32, within 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, make_adapter, sample_inputs
from hub_builders import (
    DoubleSeqBnConfig,
    SeqBnConfig,
    adapters,
    outputs,
    save_hub,
    share_layer_weights,
    zero_biases,
)
from peft import PeftModel
from safetensors import safe_open
from typer.testing import CliRunner

import adaptrix
from adaptrix.api.compile import load
from adaptrix.cli import app
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.passes.fuse_hybrid import FuseHybridOptions, fuse_hybrid
from adaptrix.runtimes.hooks.bundle import TENSORS_FILE

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "key", "value"]}
NONLINEAR = SeqBnConfig(reduction_factor=4)
# SeqBn reads h + r (original_ln_before) by default: linear in the projection's output only without it
LINEAR = SeqBnConfig(reduction_factor=4, non_linearity="linear", original_ln_before=False)
runner = CliRunner()


@torch.no_grad()
def reference(family, base, lora, hub):
    """PEFT's LoRA merged into the base, then AdapterHub's adapter loaded and active on it."""
    model = PeftModel.from_pretrained(load_model(family, base), lora).merge_and_unload()
    adapters.init(model)
    model.set_active_adapters(model.load_adapter(str(hub)))
    return outputs(model.eval(), family)


def shared_without_biases(model):
    """Layer 0's output bottleneck used by every layer, its biases zero (Llama's projections have none)."""
    share_layer_weights(model)
    zero_biases(model)


def make_pair(family, base, root, config, edit=None):
    lora = make_adapter(family, base, root / "lora", target_modules=ATTENTION[family])
    hub, _ = save_hub(family, base, config, root / "hub", edit=edit)
    return lora, hub, reference(family, base, lora, hub)


def attached(family, base, bundle):
    model = load_model(family, base)
    with adaptrix.attach(model, bundle):
        return outputs(model, family)


def pass_report(out):
    [record] = json.loads((out / "manifest.json").read_text())["passes"]
    assert record["name"] == "fuse-hybrid"
    return record["report"]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_lora_and_seqbn_match_both_libraries_in_hooks(family, bases, tmp_path):
    base = bases(family)
    lora, hub, expected = make_pair(family, base, tmp_path, NONLINEAR)
    assert (outputs(load_model(family, base), family) - expected).abs().max() > 100 * FP32_TOLERANCE
    adaptrix.compile_adapter([lora, hub], base, "hooks", tmp_path / "bundle", passes=["fuse-hybrid"])
    assert (attached(family, base, tmp_path / "bundle") - expected).abs().max() <= FP32_TOLERANCE
    report = pass_report(tmp_path / "bundle")
    sites = [entry["sites"] for entry in report["inputs"]]
    assert sites == [{"LowRank": 2 * len(ATTENTION[family])}, {"Bottleneck": 2}]
    assert report["folded"] == [] and report["conflicts"] == []
    assert all("nonlinear" in entry["why"] for entry in report["bottlenecks_kept"])


@pytest.mark.parametrize(
    ("family", "config"), [("llama", LINEAR), ("bert", LINEAR), ("llama", DoubleSeqBnConfig(
        reduction_factor=4, non_linearity="linear"))]  # attn_o: the bottleneck reads o_proj's LoRA
)  # fmt: skip
def test_identity_bottleneck_folds_exactly_into_merged(family, config, bases, tmp_path):
    base = bases(family)
    edit = zero_biases if family == "llama" else None  # Llama's projections have no bias to take them
    lora, hub, expected = make_pair(family, base, tmp_path, config, edit=edit)
    out = tmp_path / "merged"
    adaptrix.compile_adapter([lora, hub], base, "merged", out, passes=["fuse-hybrid:fold=true"])
    assert (outputs(load_model(family, out), family) - expected).abs().max() <= FP32_TOLERANCE
    report = pass_report(out)
    assert report["bottlenecks_kept"] == []
    assert len(report["folded"]) == (4 if isinstance(config, DoubleSeqBnConfig) else 2)
    assert all(entry["exact"] and entry["rank"] == 8 for entry in report["folded"])


def test_cli_compiles_and_merged_refuses_an_unfolded_bottleneck(bases, tmp_path):
    base = bases("llama")
    lora, hub, expected = make_pair("llama", base, tmp_path, LINEAR, edit=zero_biases)
    args = ["compile", str(lora), str(hub), "--base", str(base), "-o"]
    result = runner.invoke(
        app, [*args, str(tmp_path / "bundle"), "--target", "hooks", "--pass", "fuse-hybrid"]
    )
    assert result.exit_code == 0, result.output
    assert (attached("llama", base, tmp_path / "bundle") - expected).abs().max() <= FP32_TOLERANCE
    refused = runner.invoke(app, [*args, str(tmp_path / "merged"), "--target", "merged",
                                  "--pass", "fuse-hybrid:fold=false"])  # fmt: skip
    assert refused.exit_code == 2
    assert "cannot be merged into weights" in refused.output and "--target hooks" in refused.output
    assert "fold=false" in refused.output
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def two_loras(bases, tmp_path_factory):
    root, base = tmp_path_factory.mktemp("conflict"), bases("llama")
    first = make_adapter("llama", base, root / "first", target_modules=["q_proj", "v_proj"])
    second = make_adapter("llama", base, root / "second", seed=5, r=2, target_modules=["q_proj"])
    return base, first, second


def test_a_conflict_is_refused_naming_the_site_and_the_option(two_loras, tmp_path):
    base, first, second = two_loras
    with pytest.raises(BadInputError) as caught:
        adaptrix.compile_adapter([first, second], base, "hooks", tmp_path / "out", passes=["fuse-hybrid"])
    message = str(caught.value)
    assert "\n" not in message and "layer 0 attn_q" in message and "on_conflict" in message
    assert not (tmp_path / "out").exists()


def merged_logits(adapters_, base, out, passes):
    adaptrix.compile_adapter(adapters_, base, "merged", out, passes=passes)
    return load_model("llama", out)(**sample_inputs("llama")).logits


def test_on_conflict_add_equals_combine_linear_and_first_keeps_the_first(two_loras, tmp_path):
    base, first, second = two_loras
    added = merged_logits([first, second], base, tmp_path / "add", ["fuse-hybrid:on_conflict=add"])
    combined = merged_logits([first, second], base, tmp_path / "combine", ["combine:method=linear"])
    assert (added - combined).abs().max() <= FP32_TOLERANCE
    report = pass_report(tmp_path / "add")
    assert {c["site"] for c in report["conflicts"]} == {"layer 0 attn_q", "layer 1 attn_q"}
    assert {c["rank"] for c in report["conflicts"]} == {6}
    kept = merged_logits([first, second], base, tmp_path / "first", ["fuse-hybrid:on_conflict=first"])
    alone = merged_logits([first], base, tmp_path / "alone", [])
    assert (kept - alone).abs().max() <= FP32_TOLERANCE


def test_bottlenecks_do_not_add(bases, tmp_path):
    base = bases("llama")
    one, _ = save_hub("llama", base, NONLINEAR, tmp_path / "one")
    two, _ = save_hub("llama", base, NONLINEAR, tmp_path / "two", seed=3)
    irs = [load(one, base), load(two, base)]
    with pytest.raises(UnsupportedError, match="Bottleneck ops do not add"):
        fuse_hybrid(irs, FuseHybridOptions(on_conflict="add"), Checkpoint(base))
    result = fuse_hybrid(irs, FuseHybridOptions(on_conflict="last"), Checkpoint(base))
    assert all(op.down is irs[1].ops[0][1].down or op.down is irs[1].ops[1][1].down for _, op in result.ir)


def test_a_shared_bottleneck_stays_stored_once(bases, tmp_path):
    base = bases("llama")
    lora, hub, expected = make_pair("llama", base, tmp_path, NONLINEAR, edit=share_layer_weights)
    bundle = tmp_path / "bundle"
    adaptrix.compile_adapter([lora, hub], base, "hooks", bundle, passes=["fuse-hybrid"])
    assert (attached("llama", base, bundle) - expected).abs().max() <= FP32_TOLERANCE
    with safe_open(bundle / TENSORS_FILE, "pt") as tensors:
        stored = [key for key in tensors.keys() if ".bottleneck." in key]  # noqa: SIM118
    assert len(stored) == 4 and all(key.startswith("model.layers.0.") for key in stored)
    assert {entry["shared"] for entry in pass_report(bundle)["bottlenecks_kept"]} == {"layer 0 mlp"}


def test_a_folded_shared_bottleneck_reports_its_pairs_per_layer(bases, tmp_path):
    base = bases("llama")
    lora, hub, expected = make_pair("llama", base, tmp_path, LINEAR, edit=shared_without_biases)
    irs = [load(lora, base), load(hub, base)]
    result = fuse_hybrid(irs, FuseHybridOptions(), Checkpoint(base))
    folded = result.report["folded"]
    assert [entry["site"] for entry in folded] == ["layer 0 mlp_down", "layer 1 mlp_down"]
    assert all(entry["shared"] == "layer 0 mlp" and entry["stored_per_layer"] for entry in folded)
    adaptrix.compile_adapter([lora, hub], base, "merged", tmp_path / "merged", passes=["fuse-hybrid"])
    got = outputs(load_model("llama", tmp_path / "merged"), "llama")
    assert (got - expected).abs().max() <= FP32_TOLERANCE
