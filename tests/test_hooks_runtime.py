"""The hooks runtime refuses what does not fit, untouched; reads bundles safely; stays light."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as tf
from builders import FP32_TOLERANCE, build_base, load_model, make_adapter, peft_logits, sample_inputs
from safetensors.torch import load_file, save_file
from test_hooks_parity import compile_bundle, logits, snapshot
from typer.testing import CliRunner

import adaptrix
from adaptrix.cli import app
from adaptrix.ir.errors import BadInputError

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_bundle(bases, tmp_path_factory):
    """A llama base and a hooks bundle with LoRA, DoRA-free, plus lm_head replaced."""
    base = bases("llama")
    tmp = tmp_path_factory.mktemp("runtime")
    adapter = make_adapter("llama", base, tmp / "adapter", modules_to_save=["lm_head"])
    return base, adapter, compile_bundle(adapter, base, tmp / "bundle")


@torch.no_grad()
def first_output(model, inputs):
    """Logits, or the last hidden state of a headless model."""
    return model(**inputs)[0]


def refused(model, bundle, inputs, match, attach=adaptrix.attach):
    """Attaching must raise a one-line error and leave the model exactly as it was."""
    state, before, handles = snapshot(model), first_output(model, inputs), adaptrix.attached(model)
    with pytest.raises(BadInputError, match=match) as error:
        attach(model, bundle)
    line = error.value.line()
    assert "\n" not in line and "left unchanged" in line and str(bundle) in line
    assert torch.equal(first_output(model, inputs), before)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert adaptrix.attached(model) == handles


def test_other_architecture_is_refused(bases, llama_bundle):
    model = load_model("gpt2", bases("gpt2"))
    refused(model, llama_bundle[2], sample_inputs("gpt2"), "compiled for a llama model, this one is gpt2")


def test_other_dimensions_are_refused(bases, llama_bundle):
    wider = bases("llama", "wide", hidden_size=64)
    refused(
        load_model("llama", wider), llama_bundle[2], sample_inputs("llama"), "hidden_size=32.*hidden_size=64"
    )


def test_other_base_of_the_same_shape_is_refused(bases, llama_bundle):
    other = bases("llama", "seed-5", seed=5)
    refused(load_model("llama", other), llama_bundle[2], sample_inputs("llama"), "other values than the base")


def test_missing_module_is_refused(llama_bundle):
    """A bundle that replaces lm_head does not fit a headless LlamaModel (which has every layer)."""
    model = tf.LlamaModel.from_pretrained(llama_bundle[0]).eval()
    refused(model, llama_bundle[2], sample_inputs("llama"), "no module 'lm_head'")


def test_failed_switch_keeps_the_attached_bundle(bases, llama_bundle, tmp_path):
    base, _, bundle = llama_bundle
    other_base = bases("llama", "seed-5", seed=5)
    misfit = compile_bundle(make_adapter("llama", other_base, tmp_path / "a"), other_base, tmp_path / "b")
    model = load_model("llama", base)
    handle = adaptrix.attach(model, bundle)
    refused(model, misfit, sample_inputs("llama"), "other values", attach=adaptrix.switch)
    assert adaptrix.attached(model) == [handle]


def test_two_bundles_replacing_one_module_are_refused(llama_bundle, tmp_path):
    base, _, bundle = llama_bundle
    second = make_adapter("llama", base, tmp_path / "a2", seed=3, modules_to_save=["lm_head"])
    model = load_model("llama", base)
    adaptrix.attach(model, bundle)
    refused(
        model,
        compile_bundle(second, base, tmp_path / "b2"),
        sample_inputs("llama"),
        "replaces lm_head.weight",
    )


def test_prefix_free_model_takes_a_bundle_compiled_with_prefixes(bases, tmp_path):
    """A bundle compiled on BertForSequenceClassification (names `bert.…`) fits a bare BertModel."""
    base = bases("bert")
    adapter = make_adapter("bert", base, tmp_path / "adapter")
    bundle = compile_bundle(adapter, base, tmp_path / "bundle")
    inputs = sample_inputs("bert")
    with_head = load_model("bert", base)
    adaptrix.attach(with_head, bundle)
    bare = tf.BertModel.from_pretrained(base).eval()
    adaptrix.attach(bare, bundle)
    with torch.no_grad():
        expected = with_head.bert(**inputs).last_hidden_state
        assert (bare(**inputs).last_hidden_state - expected).abs().max() <= FP32_TOLERANCE


def test_bundle_of_a_bf16_base_fits_the_base_loaded_in_float32(tmp_path):
    base = build_base("llama", tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    bundle = compile_bundle(adapter, base, tmp_path / "bundle")
    inputs = sample_inputs("llama")
    model = load_model("llama", base, torch.float32)
    adaptrix.attach(model, bundle)
    assert (logits(model, inputs) - peft_logits("llama", base, adapter, inputs)).abs().max() <= FP32_TOLERANCE


def _no_manifest(bundle, tmp):
    (bundle / "manifest.json").unlink()
    return bundle, "no manifest.json"


def _merged_artifact(bundle, tmp):
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["bundle"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle / "manifest.json", "not a hooks bundle"


def _future_format(bundle, tmp):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["bundle"]["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle / "manifest.json", "format 99"


def _tensors_missing(bundle, tmp):
    (bundle / "bundle.safetensors").unlink()
    return bundle / "bundle.safetensors", "is missing"


def _tensor_wrong_shape(bundle, tmp):
    tensors = load_file(bundle / "bundle.safetensors")
    key = next(k for k in tensors if k.endswith("lora_up"))
    tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, bundle / "bundle.safetensors")
    return bundle / "bundle.safetensors", "expected"


def _tensor_not_finite(bundle, tmp):
    tensors = load_file(bundle / "bundle.safetensors")
    key = next(k for k in tensors if k.endswith("lora_down"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bundle / "bundle.safetensors")
    return bundle / "bundle.safetensors", "NaN"


def _truncated(bundle, tmp):
    data = (bundle / "bundle.safetensors").read_bytes()
    (bundle / "bundle.safetensors").write_bytes(data[: len(data) // 2])
    return bundle / "bundle.safetensors", "cannot be read"


BROKEN = [_no_manifest, _merged_artifact, _future_format, _tensors_missing, _tensor_wrong_shape,
          _tensor_not_finite, _truncated]  # fmt: skip


@pytest.mark.parametrize("corrupt", BROKEN, ids=[f.__name__.strip("_") for f in BROKEN])
def test_broken_bundles_are_clear_errors(corrupt, llama_bundle, tmp_path):
    bundle = shutil.copytree(llama_bundle[2], tmp_path / "bundle")
    named, message = corrupt(bundle, tmp_path)
    with pytest.raises(BadInputError, match=message) as error:
        adaptrix.load_bundle(bundle)
    assert str(named) in error.value.line()
    model = load_model("llama", llama_bundle[0])
    with pytest.raises(BadInputError):
        adaptrix.attach(model, bundle)
    assert adaptrix.attached(model) == []


def test_runtime_imports_none_of_the_compiler(llama_bundle):
    code = (
        "import sys, torch, adaptrix\n"
        "from adaptrix.runtimes.hooks import attach, switch, load_bundle\n"
        f"load_bundle({str(llama_bundle[2])!r})\n"
        "heavy = {'peft', 'transformers', 'onnx', 'onnxruntime', 'optimum', 'adapters', 'typer'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_compiles_and_inspects_a_bundle(bases, tmp_path):
    base = bases("phi3")
    adapter = make_adapter("phi3", base, tmp_path / "adapter", use_dora=True, rank_pattern={"o_proj": 2})
    bundle = tmp_path / "bundle"
    result = runner.invoke(
        app, ["compile", str(adapter), "--base", str(base), "--target", "hooks", "-o", str(bundle)]
    )
    assert result.exit_code == 0, result.output
    report = runner.invoke(app, ["inspect", str(bundle), "--json"])
    assert report.exit_code == 0, report.output
    summary = json.loads(report.stdout)
    assert summary["format"] == "adaptrix-hooks-bundle" and summary["layers"] == [0, 1]
    rows = {row["module"]: row for row in summary["rows"]}
    qkv = rows["model.layers.0.self_attn.qkv_proj"]
    assert qkv["op"] == "dora" and qkv["rank"] == 4
    assert qkv["sites"] == ["layer 0 attn_q", "layer 0 attn_k", "layer 0 attn_v"]
    assert rows["model.layers.1.self_attn.o_proj"]["rank"] == 2
    assert summary["bytes"] == 4 * summary["parameters"]
    table = runner.invoke(app, ["inspect", str(bundle)], terminal_width=80)
    assert table.exit_code == 0 and "qkv_proj" in table.stdout
    merged = tmp_path / "merged"
    assert (
        runner.invoke(app, ["compile", str(adapter), "--base", str(base), "-o", str(merged)]).exit_code == 0
    )
    other = runner.invoke(app, ["inspect", str(merged)])  # another artifact: what its manifest says
    assert other.exit_code == 0 and "merged for a phi3 base" in other.stdout
