"""The hooks target: a bundle attached to a plain model computes what PEFT computes (float32).

Every case also detaches the bundle and checks that the model's outputs and state_dict are
bit for bit the untouched base's.
"""

import json

import pytest
import torch
from builders import FAMILIES, FP32_TOLERANCE, load_model, make_adapter, peft_logits, sample_inputs
from test_parity_features import FEATURES

import adaptrix


def compile_bundle(adapter, base, out):
    adaptrix.compile_adapter(adapter, base, "hooks", out)
    return out


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_untouched(model, state, base_logits, inputs):
    """Detached: outputs and state_dict exactly the base's, and no hook left behind."""
    assert torch.equal(logits(model, inputs), base_logits)
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert not any(m._forward_hooks for m in model.modules())
    assert adaptrix.attached(model) == []


def check_attach_matches_peft(family, base, adapter, bundle):
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    model = load_model(family, base)
    state, base_logits = snapshot(model), logits(model, inputs)
    assert (base_logits - expected).abs().max() > 100 * FP32_TOLERANCE  # the adapter matters
    handle = adaptrix.attach(model, bundle)
    got = logits(model, inputs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    handle.detach()
    assert_untouched(model, state, base_logits, inputs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_peft_and_detaches_exactly(family, bases, tmp_path):
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter")
    check_attach_matches_peft(family, base, adapter, compile_bundle(adapter, base, tmp_path / "bundle"))


@pytest.mark.parametrize(
    ("family", "variant", "lora"), [case[1:] for case in FEATURES], ids=[case[0] for case in FEATURES]
)
def test_feature_matches_peft(family, variant, lora, bases, tmp_path):
    base = bases(family, json.dumps(variant, sort_keys=True), **variant)
    torch.manual_seed(1)  # PEFT draws LoRA weights from the global generator: the same whatever ran before
    adapter = make_adapter(family, base, tmp_path / "adapter", **lora)
    check_attach_matches_peft(family, base, adapter, compile_bundle(adapter, base, tmp_path / "bundle"))


def test_bundle_layout_is_the_modules_own(bases, tmp_path):
    """Fused modules get one fused pair at compile time; the manifest says what the issue lists."""
    base = bases("gpt2")
    adapter = make_adapter("gpt2", base, tmp_path / "adapter", target_modules=["c_attn"], r=4)
    bundle = compile_bundle(adapter, base, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    section = manifest["bundle"]
    assert section["format_version"] == 1 and section["dtype"] == "float32"
    assert section["base"]["model_type"] == "gpt2"
    assert section["base"]["dimensions"]["hidden_size"] == 32
    assert len(section["base"]["config_sha256"]) == len(section["base"]["weights_index_sha256"]) == 64
    entry = section["modules"][0]
    assert entry["name"] == "transformer.h.0.attn.c_attn"
    assert entry["layout"] == "conv1d"
    assert entry["sites"] == ["layer 0 attn_q", "layer 0 attn_k", "layer 0 attn_v"]
    assert entry["lora"]["rank"] == 4 and entry["lora"]["scale"] == 2.0  # one shared A: rank stays 4
    bundled = adaptrix.load_bundle(bundle)
    assert tuple(bundled.tensors[entry["lora"]["up"]].shape) == (4, 96)  # (scale B).T, fused rows
    assert tuple(bundled.tensors[entry["lora"]["down"]].shape) == (32, 4)
    assert manifest["files"] == ["bundle.safetensors"]


def two_adapter_peft_logits(family, base, adapters, inputs, scale=1.0):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(family, base), adapters[0], adapter_name="first")
    model.load_adapter(adapters[1], adapter_name="second")
    model.base_model.set_adapter(["first", "second"])
    with torch.no_grad():
        return model(**inputs).logits


def two_llama_adapters(base, tmp_path):
    """Two adapters for the llama base that differ in seed, rank and targets."""
    first = make_adapter("llama", base, tmp_path / "a1", seed=1)
    second = make_adapter("llama", base, tmp_path / "a2", seed=2, r=8, target_modules=["q_proj", "down_proj"])
    return first, second


def test_two_bundles_add_up_like_two_active_peft_adapters(bases, tmp_path):
    base = bases("llama")
    first, second = two_llama_adapters(base, tmp_path)
    inputs = sample_inputs("llama")
    expected = two_adapter_peft_logits("llama", base, [first, second], inputs)
    model = load_model("llama", base)
    state, base_logits = snapshot(model), logits(model, inputs)
    bundles = [compile_bundle(a, base, tmp_path / f"b{i}") for i, a in enumerate((first, second))]
    handles = [adaptrix.attach(model, bundle) for bundle in bundles]
    assert (logits(model, inputs) - expected).abs().max() <= FP32_TOLERANCE
    assert adaptrix.attached(model) == handles
    handles[1].detach()
    alone = peft_logits("llama", base, first, inputs)
    assert (logits(model, inputs) - alone).abs().max() <= FP32_TOLERANCE
    handles[0].detach()
    handles[0].detach()  # a second detach does nothing
    assert_untouched(model, state, base_logits, inputs)


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_live_scale_matches_peft_scale_layer(lora, bases, tmp_path):
    from peft import PeftModel

    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter", **lora)
    inputs = sample_inputs("llama")
    reference = PeftModel.from_pretrained(load_model("llama", base), adapter)
    for module in reference.modules():
        if hasattr(module, "scale_layer"):
            module.scale_layer(0.5)
    expected = logits(reference, inputs)
    model = load_model("llama", base)
    base_logits = logits(model, inputs)
    handle = adaptrix.attach(model, compile_bundle(adapter, base, tmp_path / "bundle"))
    full = logits(model, inputs)
    handle.scale = 0.5
    assert (logits(model, inputs) - expected).abs().max() <= FP32_TOLERANCE
    handle.scale = 1.0
    assert torch.equal(logits(model, inputs), full)
    if not lora:
        handle.scale = 0.0
        assert torch.equal(logits(model, inputs), base_logits)


def test_switch_replaces_what_is_attached(bases, tmp_path):
    base = bases("gpt2")
    first = compile_bundle(make_adapter("gpt2", base, tmp_path / "a1", seed=1), base, tmp_path / "b1")
    second_adapter = make_adapter("gpt2", base, tmp_path / "a2", seed=2)
    second = compile_bundle(second_adapter, base, tmp_path / "b2")
    inputs = sample_inputs("gpt2")
    model = load_model("gpt2", base)
    adaptrix.attach(model, first)
    handle = adaptrix.switch(model, adaptrix.load_bundle(second))
    assert adaptrix.attached(model) == [handle]
    expected = peft_logits("gpt2", base, second_adapter, inputs)
    assert (logits(model, inputs) - expected).abs().max() <= FP32_TOLERANCE


def test_inference_mode_and_gradients(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter", use_dora=True)
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapter, inputs)
    model = load_model("llama", base)
    with torch.inference_mode():
        handle = adaptrix.attach(model, compile_bundle(adapter, base, tmp_path / "bundle"))
        got = model(**inputs).logits
        handle.scale = 0.5
        handle.scale = 1.0
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    loss = model(**inputs).logits.square().mean()  # grad mode: the hooks must not break backward
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert (model(**inputs).logits.detach() - expected).abs().max() <= FP32_TOLERANCE


def check_half_precision(dtype, bases, tmp_path, device="cpu"):
    """A `dtype` model on `device` with a DoRA bundle: as close to PEFT's float32 logits as PEFT
    itself is in that precision there."""
    from peft import PeftModel

    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter", use_dora=True)
    inputs = sample_inputs("llama")
    exact = peft_logits("llama", base, adapter, inputs)
    moved = {name: value.to(device) for name, value in inputs.items()}
    reference = logits(PeftModel.from_pretrained(load_model("llama", base, dtype).to(device), adapter), moved)
    model = load_model("llama", base, dtype).to(device)
    adaptrix.attach(model, compile_bundle(adapter, base, tmp_path / "bundle"))
    got = logits(model, moved)
    assert got.dtype == dtype and got.device.type == torch.device(device).type
    # Both round through half precision differently; each stays as close to fp32 as PEFT does.
    peft_error = (reference.float().cpu() - exact).abs().max()
    assert (got.float().cpu() - exact).abs().max() <= 2 * peft_error + 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_match_peft_in_that_precision(dtype, bases, tmp_path):
    check_half_precision(dtype, bases, tmp_path)
