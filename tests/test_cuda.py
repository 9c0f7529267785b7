"""On a GPU: hooks bundles on CUDA models and onnx-cuda outputs on onnxruntime's CUDA provider.

The references are computed on the CPU in float32 (PEFT's forward, AdapterHub's forward); the
bounds are the CPU tests' (1e-4 for float32 hooks, FP16_TOLERANCE for float16 graphs). Skipped
without a CUDA device or without onnxruntime's CUDA provider (onnxruntime-gpu).

ADAPTRIX_TEST_DEVICE=cpu and ADAPTRIX_TEST_PROVIDER=CPUExecutionProvider run the same checks on
the CPU: run them so after changing this file on a machine without a GPU (the suite does not).
"""

from __future__ import annotations

import json
import os

import onnxruntime as ort
import pytest
import torch
from builders import (
    FAMILIES,
    FP32_TOLERANCE,
    ONNX_FAMILIES,
    load_model,
    make_adapter,
    peft_logits,
    sample_inputs,
)
from hub_builders import (
    ConfigUnion,
    DoubleSeqBnConfig,
    LoRAConfig,
    ParBnConfig,
    SeqBnConfig,
    save_hub,
    share_layer_weights,
)
from peft import PeftModel
from test_hooks_parity import (
    check_half_precision,
    compile_bundle,
    two_adapter_peft_logits,
    two_llama_adapters,
)
from test_onnx_parity import (
    DECODERS,
    FP16_TOLERANCE,
    activate,
    assert_matches,
    base_logits,
    max_diff,
    onnx_base,
    optimum_tokens,
    peft_tokens,
    positions_of,
    prefill,
    prompt_of,
    seeded_adapter,
    session,
    step,
)
from test_parity_features import FEATURES
from test_peft_kinds import FUSED_KINDS, LLAMA_KINDS, perturbed

import adaptrix
from adaptrix.api.compile import compile_adapter

pytestmark = pytest.mark.onnx_export

DEVICE = os.environ.get("ADAPTRIX_TEST_DEVICE", "cuda")
PROVIDER = os.environ.get("ADAPTRIX_TEST_PROVIDER", "CUDAExecutionProvider")

needs_device = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
needs_provider = pytest.mark.skipif(
    PROVIDER not in ort.get_available_providers(), reason=f"needs onnxruntime's {PROVIDER}"
)


def on_device(inputs: dict) -> dict:
    return {name: value.to(DEVICE) for name, value in inputs.items()}


@torch.no_grad()
def device_logits(model, inputs: dict) -> torch.Tensor:
    """The logits of `inputs` moved to DEVICE, back on the CPU."""
    return model(**on_device(inputs)).logits.cpu()


def check_on_device(family, base, bundle, expected, hidden=False):
    """Attached under inference_mode on DEVICE: the reference's outputs within 1e-4; detached:
    the untouched model's outputs and state_dict bit for bit, and no hook left."""
    inputs = on_device(sample_inputs(family))
    model = load_model(family, base).to(DEVICE)

    def run():
        with torch.inference_mode():
            if hidden:
                return model(**inputs, output_hidden_states=True).hidden_states[-1].cpu()
            return model(**inputs).logits.cpu()

    state = {name: value.clone() for name, value in model.state_dict().items()}
    before = run()
    assert (before - expected).abs().max() > 100 * FP32_TOLERANCE  # the adapter matters
    with torch.inference_mode():
        handle = adaptrix.attach(model, bundle)
    got = run()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= FP32_TOLERANCE, (got - expected).abs().max()
    handle.detach()
    assert torch.equal(run(), before)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert all(v.device.type == torch.device(DEVICE).type for v in now.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- hooks on a CUDA model -------------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_hooks_family_on_device(family, bases, tmp_path):
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter")
    expected = peft_logits(family, base, adapter, sample_inputs(family))
    check_on_device(family, base, compile_bundle(adapter, base, tmp_path / "bundle"), expected)


@needs_device
@pytest.mark.parametrize(
    ("family", "variant", "lora"), [case[1:] for case in FEATURES], ids=[case[0] for case in FEATURES]
)
def test_hooks_feature_on_device(family, variant, lora, bases, tmp_path):
    """rsLoRA, patterns, biases, DoRA, modules_to_save, embedding and lm_head LoRA."""
    base = bases(family, json.dumps(variant, sort_keys=True), **variant)
    adapter = make_adapter(family, base, tmp_path / "adapter", **lora)
    expected = peft_logits(family, base, adapter, sample_inputs(family))
    check_on_device(family, base, compile_bundle(adapter, base, tmp_path / "bundle"), expected)


PEFT_KINDS = {**{kind: ("llama", config) for kind, config in LLAMA_KINDS.items()}, **FUSED_KINDS}


@needs_device
@pytest.mark.parametrize("kind", sorted(PEFT_KINDS))
def test_hooks_peft_kind_on_device(kind, bases, tmp_path):
    family, config = PEFT_KINDS[kind]
    base = bases(family)
    adapter = perturbed(load_model(family, base), config, tmp_path / "adapter")
    expected = peft_logits(family, base, adapter, sample_inputs(family))
    check_on_device(family, base, compile_bundle(adapter, base, tmp_path / "bundle"), expected)


HUB_KINDS = {
    "seqbn": SeqBnConfig(reduction_factor=4),
    "doubleseqbn": DoubleSeqBnConfig(reduction_factor=4, ln_after=True),
    "parbn": ParBnConfig(reduction_factor=4),
    "lora+seqbn": ConfigUnion(
        LoRAConfig(r=4, alpha=8, intermediate_lora=True, output_lora=True), SeqBnConfig(reduction_factor=4)
    ),
}


@needs_device
@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("kind", sorted(HUB_KINDS))
def test_hooks_adapterhub_on_device(family, kind, bases, tmp_path):
    """Bottlenecks (and AdapterHub's LoRA) run unmerged on the device; the shared case too."""
    base = bases(family)
    edit = share_layer_weights if kind == "seqbn" else None
    adapter, expected = save_hub(family, base, HUB_KINDS[kind], tmp_path / "adapter", edit=edit)
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    check_on_device(family, base, tmp_path / "bundle", expected, hidden=family == "bert")


@needs_device
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hooks_half_precision_on_device(dtype, bases, tmp_path):
    check_half_precision(dtype, bases, tmp_path, DEVICE)


@needs_device
def test_two_bundles_and_switch_on_device(bases, tmp_path):
    base = bases("llama")
    first, second = two_llama_adapters(base, tmp_path)
    inputs = sample_inputs("llama")
    both = two_adapter_peft_logits("llama", base, [first, second], inputs)
    model = load_model("llama", base).to(DEVICE)
    bundles = [compile_bundle(a, base, tmp_path / f"b{i}") for i, a in enumerate((first, second))]
    for bundle in bundles:
        adaptrix.attach(model, bundle)
    got = device_logits(model, inputs)
    assert (got - both).abs().max() <= FP32_TOLERANCE
    adaptrix.switch(model, bundles[1])
    got = device_logits(model, inputs)
    assert (got - peft_logits("llama", base, second, inputs)).abs().max() <= FP32_TOLERANCE


# --- onnx-cuda on onnxruntime's CUDA provider --------------------------------------------------


def provider_session(out):
    sess = session(out, providers=(PROVIDER,))
    assert sess.get_providers()[0] == PROVIDER
    return sess


@needs_provider
@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx_cuda_prefill_and_decode_step_on_the_provider(family, bases, tmp_path):
    """float16 weights and activations against PEFT float32: a left-padded prefill, then (decoders)
    one decode step fed the prefill's KV cache."""
    base = onnx_base(bases, family)
    adapter = seeded_adapter(family, base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cuda", tmp_path / "out")
    sess = provider_session(tmp_path / "out")
    inputs = sample_inputs(family)
    assert_matches(prefill(sess, inputs), peft_logits(family, base, adapter, inputs),
                   base_logits(family, base, inputs), FP16_TOLERANCE)  # fmt: skip
    if FAMILIES[family].encoder:
        return
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = positions_of(mask)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_model(family, base), adapter).eval()
        expected = peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    first = step(sess, ids[:, :-1], mask[:, :-1], positions[:, :-1])
    valid = mask[:, :-1].bool()
    assert max_diff(torch.from_numpy(first["logits"])[valid], expected[:, :-1][valid]) <= FP16_TOLERANCE
    last = step(sess, ids[:, -1:], mask, positions[:, -1:], past=first)
    assert last["logits"].dtype.name == "float16"
    assert max_diff(torch.from_numpy(last["logits"])[:, -1], expected[:, -1]) <= FP16_TOLERANCE


@needs_provider
@pytest.mark.parametrize("family", DECODERS)
def test_onnx_cuda_optimum_generates_peft_tokens_on_the_provider(family, bases, tmp_path):
    """ORTModelForCausalLM on the float16 graph continues greedily as PEFT (float32) does."""
    base = onnx_base(bases, family)
    adapter = seeded_adapter(family, base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cuda", tmp_path / "out")
    prompt = prompt_of(family)
    expected = peft_tokens(family, base, adapter, prompt)
    assert expected != peft_tokens(family, base, None, prompt)  # the adapter changes the tokens
    assert optimum_tokens(tmp_path / "out", prompt, provider=PROVIDER) == expected


@needs_provider
@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx_cuda_unmerged_adapter_files_on_the_provider(family, bases, tmp_path):
    """Each float16 `.onnx_adapter` active gives PEFT with that adapter; none active, the base."""
    base = onnx_base(bases, family)
    targets = list(FAMILIES[family].targets)
    adapters = {
        "plain": seeded_adapter(family, base, tmp_path / "plain", seed=1),
        "rslora": seeded_adapter(family, base, tmp_path / "rslora", seed=2, r=8, lora_alpha=16,
                                 use_rslora=True, target_modules=targets[-2:]),
    }  # fmt: skip
    out = tmp_path / "out"
    compile_adapter(list(adapters.values()), base, "onnx-cuda", out, unmerged=True)
    sess = provider_session(out)
    inputs = sample_inputs(family)
    plain = base_logits(family, base, inputs)
    assert max_diff(prefill(sess, inputs), plain) <= FP16_TOLERANCE
    for name, adapter in adapters.items():
        got = prefill(sess, inputs, activate(out / "adapters" / f"{name}.onnx_adapter"))
        assert_matches(got, peft_logits(family, base, adapter, inputs), plain, FP16_TOLERANCE)
    assert max_diff(prefill(sess, inputs), plain) <= FP16_TOLERANCE


@needs_provider
@pytest.mark.parametrize("kind", ["seqbn", "parbn"])
def test_onnx_cuda_bottleneck_on_the_provider(kind, bases, tmp_path):
    base = bases("llama")
    adapter, expected = save_hub("llama", base, HUB_KINDS[kind], tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cuda", tmp_path / "out")
    inputs = sample_inputs("llama")
    got = prefill(provider_session(tmp_path / "out"), inputs)
    assert_matches(got, expected, base_logits("llama", base, inputs), FP16_TOLERANCE)
