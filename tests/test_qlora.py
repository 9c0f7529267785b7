"""QLoRA: adapters trained on a bitsandbytes-quantized base, merged into what they were trained on.

A tiny Llama (hidden 64: bitsandbytes quantizes in blocks of 64) is quantized by transformers
(nf4 with double quantization, fp4, 8-bit) and saved; a PEFT LoRA is made on the quantized
model. PEFT's forward on the quantized model is the reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import FP32_TOLERANCE, build_base, sample_inputs
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

import adaptrix
from adaptrix.api.compile import compile_adapter
from adaptrix.artifacts import MANIFEST_NAME
from adaptrix.ir.errors import BadInputError, UnsupportedError

_DIMS = dict(
    hidden_size=64, intermediate_size=192
)  # not the vocabulary size: see test_onnx_from_a_quantized_base
_SCHEMES = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}  # fmt: skip
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantized(path, scheme: str):
    """The base loaded by transformers with bitsandbytes, in float32 compute."""
    config = tf.BitsAndBytesConfig(**_SCHEMES[scheme])
    return tf.LlamaForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """{scheme: (full-precision base, quantized base, adapter, qlora config file)}."""
    root = tmp_path_factory.mktemp("qlora")
    full = build_base("llama", root / "full", **_DIMS)
    made = {}
    for scheme in _SCHEMES:
        model = _quantized(full, scheme)
        model.save_pretrained(root / scheme)
        torch.manual_seed(1)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(root / f"{scheme}-adapter")
        config = root / f"{scheme}.json"
        saved = json.loads((root / scheme / "config.json").read_text())
        config.write_text(json.dumps(saved["quantization_config"]))
        made[scheme] = (full, root / scheme, root / f"{scheme}-adapter", config)
    return made


@torch.no_grad()
def _peft_logits(base, adapter, inputs: dict, *, train: bool = True) -> torch.Tensor:
    """PEFT on the quantized model (dropout 0). In training mode bitsandbytes dequantizes each weight
    and multiplies in float32: the function the adapter was trained on. In eval mode on CPU its
    inference kernels round more (4-bit: absmax in bfloat16 on AVX512-BF16 CPUs, logits off by
    ~9e-4 here; 8-bit: int8 activations, LLM.int8()), which no unquantized model computes."""
    model = PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return model.train(train)(**inputs).logits


@pytest.mark.parametrize("scheme", list(_SCHEMES))
def test_merged_into_dequantized_equals_peft_on_quantized_base(qlora, tmp_path, scheme):
    _, base, adapter, _ = qlora[scheme]
    inputs = sample_inputs("llama")
    compile_adapter(adapter, base, "merged", tmp_path / "out", dtype="float32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["quantized_base"]["merge_into"] == "dequantized"
    merged = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        diff = (merged(**inputs).logits - _peft_logits(base, adapter, inputs)).abs().max().item()
    assert diff <= FP32_TOLERANCE, diff


@pytest.mark.parametrize("scheme", list(_SCHEMES))
def test_qlora_base_gives_the_weights_merged_into_the_dequantized_base(qlora, tmp_path, scheme):
    full, base, adapter, config = qlora[scheme]
    compile_adapter(adapter, base, "merged", tmp_path / "deq", dtype="float32", merge_into="dequantized")
    compile_adapter(adapter, full, "merged", tmp_path / "sim", dtype="float32", qlora_base=config)
    deq = load_file(tmp_path / "deq" / "model.safetensors")
    sim = load_file(tmp_path / "sim" / "model.safetensors")
    assert deq.keys() == sim.keys()
    for name, value in deq.items():
        torch.testing.assert_close(sim[name], value, rtol=0, atol=0, msg=name)
    plain = load_file(compile_adapter(adapter, full, "merged", tmp_path / "plain", dtype="float32").out
                      / "model.safetensors")  # fmt: skip
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(plain[q_proj], deq[q_proj])  # the full-precision merge is another function
    manifest = json.loads((tmp_path / "sim" / MANIFEST_NAME).read_text())
    assert manifest["quantized_base"]["merge_into"] == "qlora-base"


@pytest.mark.parametrize("scheme", ["nf4-dq", "int8"])
@pytest.mark.parametrize("train", [False, True])
def test_hooks_on_the_quantized_model_equal_peft_on_it(qlora, tmp_path, scheme, train):
    _, base, adapter, _ = qlora[scheme]
    inputs = sample_inputs("llama")
    compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    model = tf.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).train(train)
    with torch.no_grad():
        model(**inputs)  # on CPU an eval forward repacks 4-bit weights for its kernel: attach reads them
    adaptrix.attach(model, tmp_path / "bundle")
    with torch.no_grad():
        diff = (model(**inputs).logits - _peft_logits(base, adapter, inputs, train=train)).abs().max().item()
    assert diff <= FP32_TOLERANCE, diff


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_bases_are_refused_naming_the_scheme(qlora, tmp_path, method):
    _, base, adapter, _ = qlora["nf4-dq"]
    fake = tmp_path / "base"
    fake.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (fake / "config.json").write_text(json.dumps(config))
    (fake / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedError, match=f"quantized with {method} \\(4-bit\\)") as caught:
        compile_adapter(adapter, fake, "merged", tmp_path / "out")
    assert "\n" not in caught.value.line()
    assert f"full-precision base the {method} model was made from" in caught.value.line()


def test_merge_into_needs_a_quantized_base_and_onnx_refuses_one(qlora, tmp_path):
    full, base, adapter, _ = qlora["nf4-dq"]
    with pytest.raises(BadInputError, match="needs a quantized base"):
        compile_adapter(adapter, full, "merged", tmp_path / "out", merge_into="dequantized")
    with pytest.raises(BadInputError, match="does not apply to --target onnx-cpu"):
        compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", qlora_base=tmp_path / "x.json")


# intermediate_size 192, not 128 (the vocabulary): onnxruntime-genai's builder (transformers 5's
# exporter) takes every Linear with vocab_size outputs for the LM head; such a base's graph fails its check
@pytest.mark.parametrize("scheme", ["nf4-dq", "int8"])
def test_onnx_from_a_quantized_base_equals_peft_on_it(qlora, tmp_path, scheme):
    """onnx-cpu from a bitsandbytes base: its dequantized copy (cached) exported, patched; PEFT's logits."""
    pytest.importorskip("onnxruntime")
    from test_onnx_parity import ONNX_FP32_TOLERANCE, prefill, session

    _, base, adapter, _ = qlora[scheme]
    cache = tmp_path / "cache"
    inputs = sample_inputs("llama")
    out = compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", cache_dir=cache).out
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["quantized_base"]["merge_into"] == "dequantized"
    assert set(manifest["inputs"]["base"]["files"]) >= {"model.safetensors", "config.json"}  # the given base
    diff = (prefill(session(out), inputs) - _peft_logits(base, adapter, inputs)).abs().max().item()
    assert diff <= ONNX_FP32_TOLERANCE, diff
    copies = list((cache / "dequantized").iterdir())
    assert len(copies) == 1  # the dequantized base, reused by a second compile
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "again", cache_dir=cache)
    assert list((cache / "dequantized").iterdir()) == copies


def test_cli_takes_merge_into_and_qlora_base(qlora, tmp_path):
    from typer.testing import CliRunner

    from adaptrix.cli import app

    full, base, adapter, config = qlora["fp4"]
    runner = CliRunner()
    args = [str(adapter), "--dtype", "float32", "--json", "-o"]
    deq = runner.invoke(app, ["compile", *args, str(tmp_path / "deq"), "--base", str(base),
                              "--merge-into", "dequantized"])  # fmt: skip
    sim = runner.invoke(app, ["compile", *args, str(tmp_path / "sim"), "--base", str(full),
                              "--qlora-base", str(config)])  # fmt: skip
    assert deq.exit_code == 0 and sim.exit_code == 0, deq.output + sim.output
    deq_tensors, sim_tensors = (load_file(tmp_path / d / "model.safetensors") for d in ("deq", "sim"))
    assert all(torch.equal(value, sim_tensors[name]) for name, value in deq_tensors.items())
    wrong = runner.invoke(app, ["compile", *args, str(tmp_path / "x"), "--base", str(full),
                                "--merge-into", "dequantized"])  # fmt: skip
    assert wrong.exit_code == 2 and "needs a quantized base" in wrong.output


@pytest.mark.parametrize("scheme", list(_SCHEMES))
def test_requantize_loads_with_transformers_and_reports_the_added_error(qlora, tmp_path, scheme):
    _, base, adapter, _ = qlora[scheme]
    inputs = sample_inputs("llama")
    compile_adapter(adapter, base, "merged", tmp_path / "out", requantize=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    saved = json.loads((base / "config.json").read_text())
    assert config["quantization_config"] == saved["quantization_config"]
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["quantized_base"]["merge_into"] == "requantized"
    errors = manifest["requantize_max_abs_error"]
    assert len(errors) == 14 and all(0 < error < 1 for error in errors.values())
    out, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    assert out.keys() == stored.keys()
    assert torch.equal(out["lm_head.weight"], stored["lm_head.weight"])  # untouched: as stored
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"],
                           stored["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).train()
    merged = compile_adapter(adapter, base, "merged", tmp_path / "deq", dtype="float32").out
    with torch.no_grad():
        requantized = model(**inputs).logits
        reference = _peft_logits(base, adapter, inputs)
        plain = tf.LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32)(**inputs).logits
    assert (plain - reference).abs().max() <= FP32_TOLERANCE
    assert 0 < (requantized - reference).abs().max() < 0.5  # the second rounding, measured


def test_requantize_needs_a_quantized_base(qlora, tmp_path):
    full, _, adapter, _ = qlora["nf4-dq"]
    with pytest.raises(BadInputError, match="--requantize needs a bitsandbytes-quantized base"):
        compile_adapter(adapter, full, "merged", tmp_path / "out", requantize=True)


def test_hooks_from_the_full_base_with_qlora_base_fit_the_quantized_model(qlora, tmp_path):
    full, base, adapter, config = qlora["nf4-dq"]
    inputs = sample_inputs("llama")
    compile_adapter(adapter, full, "hooks", tmp_path / "bundle", qlora_base=config)
    model = _quantized(full, "nf4-dq").train()
    adaptrix.attach(model, tmp_path / "bundle")
    with torch.no_grad():
        diff = (model(**inputs).logits - _peft_logits(base, adapter, inputs)).abs().max().item()
    assert diff <= FP32_TOLERANCE, diff


def test_gpt2_conv1d_weights_quantized_transposed(tmp_path):
    no_dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # the reference runs in training mode
    full = build_base("gpt2", tmp_path / "full", n_embd=64, **no_dropout)
    config = tf.BitsAndBytesConfig(**_SCHEMES["nf4-dq"])
    model = tf.GPT2LMHeadModel.from_pretrained(full, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "nf4")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    (tmp_path / "bnb.json").write_text(json.dumps(config.to_dict()))
    inputs = sample_inputs("gpt2")
    adapter = tmp_path / "adapter"
    deq = compile_adapter(adapter, tmp_path / "nf4", "merged", tmp_path / "deq", dtype="float32").out
    sim = compile_adapter(
        adapter, full, "merged", tmp_path / "sim", dtype="float32", qlora_base=tmp_path / "bnb.json"
    ).out
    merged = tf.GPT2LMHeadModel.from_pretrained(deq, dtype=torch.float32)
    quantized = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "nf4", dtype=torch.float32)
    peft = PeftModel.from_pretrained(quantized, adapter).train()
    with torch.no_grad():
        diff = (merged(**inputs).logits - peft(**inputs).logits).abs().max().item()
    assert diff <= FP32_TOLERANCE, diff
    deq_tensors, sim_tensors = load_file(deq / "model.safetensors"), load_file(sim / "model.safetensors")
    assert all(torch.equal(value, sim_tensors[name]) for name, value in deq_tensors.items())


def test_a_bf16_base_trained_in_float32_merges_into_the_float32_dequantized_weights(qlora, tmp_path):
    """bitsandbytes' 4-bit matmul dequantizes into the compute dtype (float32 here), not into the
    bfloat16 the weights were quantized from: merging the bfloat16-rounded values is ~1e-3 off."""
    full, _, _, _ = qlora["nf4-dq"]
    tf.LlamaForCausalLM.from_pretrained(full, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = tf.BitsAndBytesConfig(**_SCHEMES["nf4-dq"])
    quantized = tf.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=config,
                                                    dtype=torch.bfloat16)  # fmt: skip
    for param in quantized.parameters():  # the rest in float32: transformers 5 loads it as stored
        param.data = param.data.float() if param.dtype == torch.bfloat16 else param.data
    quantized.save_pretrained(tmp_path / "nf4")
    (tmp_path / "bnb.json").write_text(json.dumps(config.to_dict()))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS, init_lora_weights=False)
    get_peft_model(quantized, lora).save_pretrained(tmp_path / "adapter")
    adapter, inputs = tmp_path / "adapter", sample_inputs("llama")
    deq = compile_adapter(adapter, tmp_path / "nf4", "merged", tmp_path / "deq", dtype="float32").out
    merged = tf.LlamaForCausalLM.from_pretrained(deq, dtype=torch.float32)
    with torch.no_grad():
        diff = (merged(**inputs).logits - _peft_logits(tmp_path / "nf4", adapter, inputs)).abs().max().item()
    assert diff <= FP32_TOLERANCE, diff
    sim = compile_adapter(adapter, tmp_path / "bf16", "merged", tmp_path / "sim", dtype="float32",
                          qlora_base=tmp_path / "bnb.json").out  # fmt: skip
    deq_tensors, sim_tensors = load_file(deq / "model.safetensors"), load_file(sim / "model.safetensors")
    assert all(torch.equal(value, sim_tensors[name]) for name, value in deq_tensors.items())


def test_reading_a_quantized_base_leaves_inductor_unimported(qlora):
    """bitsandbytes wraps kernels in torch.compile on import, which imports inductor (600 modules,
    seconds: more than merging a 1B model): a read must not pay that for kernels it never calls."""
    import subprocess
    import sys

    _, base, _, _ = qlora["nf4-dq"]
    code = ("import sys, torch; from adaptrix.io.checkpoint import Checkpoint; "
            f"value = Checkpoint({str(base)!r}).read('model.layers.0.self_attn.q_proj.weight'); "
            "assert 'bitsandbytes.functional' in sys.modules and value.dtype == torch.float32; "
            "print('torch._inductor.compile_fx' in sys.modules, 'torch._dynamo' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # nor torch._dynamo, which a first call of bitsandbytes' torch ops imports (bnb_cpu.py skips them)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_the_4bit_kernel_called_directly_gives_bitsandbytes_own_values(quant_type, nested, dtype):
    from adaptrix.io import bnb_cpu
    from adaptrix.io.bnb_import import bnb_functional

    functional = bnb_functional()
    assert bnb_cpu._native() is not None  # bitsandbytes' native library loads here: the direct call is tested
    for shape in ((96, 320), (3, 64), (64,)):  # a 1-D weight goes to bitsandbytes itself
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 0.05
        packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested,
                                                 quant_type=quant_type)  # fmt: skip
        state.dtype = dtype
        assert torch.equal(bnb_cpu.dequantize_4bit(functional, packed, state),
                           functional.dequantize_4bit(packed, state))  # fmt: skip
