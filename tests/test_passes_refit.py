"""refit: an adapter carried to a re-parameterised base (same function, other module inputs) is exact."""

import json

import pytest
import torch
from builders import FP32_TOLERANCE, build_base, load_model, peft_logits, sample_inputs
from pass_builders import assert_carry_refused, assert_dora_refused, carry_case
from test_hooks_parity import logits

import adaptrix


def reparameterised(source, dest):
    """The source's function with the inputs of q, k, v, gate and up rescaled per feature.

    Each norm's weight times s and the columns of the projections reading it divided by s. (A
    rescaled o_proj or down_proj input would need v's or up's output rescaled too, and refit keeps
    B: only inputs are re-fit, so only they are moved here.)
    """
    model = load_model("llama", source)
    generator = torch.Generator().manual_seed(7)

    def factor(n):
        return torch.exp(torch.randn(n, generator=generator) * 0.5)

    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            s = factor(layer.input_layernorm.weight.shape[0])
            layer.input_layernorm.weight.mul_(s)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.div_(s)
            s = factor(layer.post_attention_layernorm.weight.shape[0])
            layer.post_attention_layernorm.weight.mul_(s)
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight.div_(s)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def setup(bases, peft_adapters, tmp_path_factory):
    return carry_case(bases, peft_adapters, tmp_path_factory.mktemp("refit"), reparameterised, 24)


def carried_logits(setup, name, passes, base=None):
    """Logits of `base` (the target unless given) with the adapter compiled onto it with `passes`."""
    _, target, adapter, _, tmp = setup
    base = base or target
    result = adaptrix.compile_adapter(adapter, base, "hooks", tmp / name, passes=passes, force=True)
    model = load_model("llama", base)
    with adaptrix.attach(model, tmp / name):
        return logits(model, sample_inputs("llama")), result


def test_the_target_computes_the_source_function(setup):
    source, target = setup[:2]
    inputs = sample_inputs("llama")
    assert (
        logits(load_model("llama", source), inputs) - logits(load_model("llama", target), inputs)
    ).abs().max() < 1e-4


def test_refit_recovers_the_adapter_on_a_reparameterised_base(setup):
    source, _, adapter, prompts, _ = setup
    expected = peft_logits("llama", source, adapter, sample_inputs("llama"))
    plain, _ = carried_logits(setup, "plain", [])
    assert (plain - expected).abs().max() > 100 * FP32_TOLERANCE  # the identity map is wrong here
    spec = f"refit:source={source},prompts={prompts},generate=4,alpha=1e-10"
    got, result = carried_logits(setup, "refit", [spec])
    assert (got - expected).abs().max() <= 10 * FP32_TOLERANCE
    report = json.loads((result.out / "manifest.json").read_text())["passes"][0]["report"]
    assert report["tokens"] == 24 * 10 and report["max_fit_error"] < 1e-3


def test_refit_on_its_own_base_keeps_the_adapter(setup):
    source, _, adapter, prompts, _ = setup
    expected = peft_logits("llama", source, adapter, sample_inputs("llama"))
    spec = f"refit:source={source},prompts={prompts},generate=0,alpha=1e-9"
    got, _ = carried_logits(setup, "self", [spec], base=source)
    assert (got - expected).abs().max() <= 10 * FP32_TOLERANCE


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ("generate=4", "source=DIR"),
        ("source={source},prompts={bad}", "not a list of non-empty token-id lists"),
        ("source={source},prompts={missing}", "cannot be read"),
        ("source={wider},prompts={prompts}", "hidden_size"),
    ],
)
def test_bad_options_are_clear_errors(options, match, setup):
    source, _, _, prompts, tmp = setup
    bad = tmp / "bad.json"
    bad.write_text("[[1, 2], [999999]]")
    wider = tmp / "wider"
    if not wider.exists():
        build_base("llama", wider, hidden_size=64)
    spec = "refit:" + options.format(
        source=source, prompts=prompts, bad=bad, missing=tmp / "none.json", wider=wider
    )
    assert_carry_refused(setup, spec, match)


def test_dora_is_refused(setup, peft_adapters):
    assert_dora_refused(setup, peft_adapters, "refit")
