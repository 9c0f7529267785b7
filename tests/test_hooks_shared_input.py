"""q, k, v (and gate, up) share one `x @ down` only while they really read the same input."""

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, make_adapter, sample_inputs
from peft import PeftModel
from test_hooks_parity import compile_bundle, logits

import adaptrix


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    base = bases("llama")
    tmp = tmp_path_factory.mktemp("shared")
    adapter = make_adapter("llama", base, tmp / "adapter")
    return base, adapter, compile_bundle(adapter, base, tmp / "bundle")


def shared_names(model, handle):
    """The modules whose hook takes its product from a shared group."""
    return {name for name, module in model.named_modules() for hook in handle._hooks
            if hook.module is module and hook.shared is not None}  # fmt: skip


def with_pre_hook(model, hook):
    """Register `hook` as a forward pre-hook on layer 0's k_proj (PEFT's wrapper or the plain one)."""
    layer = model.base_model.model.model.layers[0] if isinstance(model, PeftModel) else model.model.layers[0]
    return layer.self_attn.k_proj.register_forward_pre_hook(hook)


def test_groups_are_the_modules_that_read_one_input(llama):
    base, _, bundle = llama
    model = load_model("llama", base)
    names = shared_names(model, adaptrix.attach(model, bundle))
    expected = {f"model.layers.{i}.{part}" for i in range(2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                             "mlp.up_proj")}  # fmt: skip
    assert names == expected


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_shared_products_equal_unshared_ones_and_keep_no_activations(mode, llama):
    base, _, bundle = llama
    inputs = sample_inputs("llama")
    model = load_model("llama", base)
    handle = adaptrix.attach(model, bundle)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        shared = model(**inputs).logits
    groups = {id(hook.shared): hook.shared for hook in handle._hooks if hook.shared is not None}
    assert len(groups) == 4 and all(group.x is None and group.low is None for group in groups.values())
    for hook in handle._hooks:
        hook.shared = None
    with context():
        alone = model(**inputs).logits
    # One GEMM over the concatenated downs may block (and so round) differently from three:
    # bit-equal on some CPUs, not on others; a wrong slice or a stale input would be off by far more.
    assert (shared - alone).abs().max() <= 1e-6


def test_a_member_reading_another_tensor_stops_the_sharing(llama):
    base, adapter, bundle = llama
    inputs = sample_inputs("llama")
    reference = PeftModel.from_pretrained(load_model("llama", base), adapter).eval()
    model = load_model("llama", base)
    handle = adaptrix.attach(model, bundle)
    for target in (reference, model):
        with_pre_hook(target, lambda module, args: (args[0] * 1.5,))  # k reads a new tensor
    expected, got = logits(reference, inputs), logits(model, inputs)
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    assert "model.layers.0.self_attn.k_proj" not in shared_names(model, handle)
    assert "model.layers.1.self_attn.k_proj" in shared_names(model, handle)  # other groups still share


def test_an_input_changed_in_place_is_not_taken_from_the_shared_product(llama):
    base, adapter, bundle = llama
    inputs = sample_inputs("llama")
    reference = PeftModel.from_pretrained(load_model("llama", base), adapter).eval()
    model = load_model("llama", base)
    adaptrix.attach(model, bundle)
    for target in (reference, model):
        with_pre_hook(target, lambda module, args: [args[0].mul_(1.5), None][1])  # q read it before
    expected, got = logits(reference, inputs), logits(model, inputs)
    assert (expected - logits(load_model("llama", base), inputs)).abs().max() > 100 * FP32_TOLERANCE
    assert (got - expected).abs().max() <= FP32_TOLERANCE
