"""distill: a LoRA carried to a base with other layers, trained against the adapted source."""

import json

import pytest
import torch
from builders import build_base, load_model, prompts_file
from pass_builders import assert_carry_refused, assert_dora_refused, carry_case
from peft import PeftModel

import adaptrix
from adaptrix.ir.errors import AdaptrixError

GENERATE = 4


def independent_layers(source, dest):
    """The source's embeddings, final norm and head around decoder layers initialised with another seed.

    (With an unrelated head too, most of the teacher's distribution lies outside the logits the
    tiny target's head can reach, and no adapter could come close.)
    """
    model = load_model("llama", build_base("llama", dest, seed=5))
    origin = load_model("llama", source)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            model.get_parameter(name).copy_(origin.get_parameter(name))
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def setup(bases, peft_adapters, tmp_path_factory):
    return carry_case(bases, peft_adapters, tmp_path_factory.mktemp("distill"), independent_layers, 48)


def answer_log_probs(model, ids):
    return torch.log_softmax(model(input_ids=ids).logits[:, -GENERATE - 1 : -1].float(), dim=-1)


@torch.no_grad()
def kl_to_peft(family, source, target, adapter, prompts, bundle):
    """KL(PEFT's adapted source || target with the bundle) at the answer positions PEFT generates."""
    teacher = PeftModel.from_pretrained(load_model(family, source), adapter).eval()
    mask = torch.ones_like(prompts)
    ids = teacher.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=GENERATE,
                           min_new_tokens=GENERATE, do_sample=False, pad_token_id=0)  # fmt: skip
    expected = answer_log_probs(teacher, ids)
    model = load_model(family, target)
    with adaptrix.attach(model, bundle):
        got = answer_log_probs(model, ids)
    return float((expected.exp() * (expected - got)).sum(-1).mean())


def test_distill_moves_the_target_towards_the_adapted_source(setup):
    source, target, adapter, _, tmp = setup
    prompts = tmp / "prompts.json"
    spec = f"distill:source={source},prompts={prompts},generate={GENERATE},steps=120,lr=0.01,batch=16"
    plain = adaptrix.compile_adapter(adapter, target, "hooks", tmp / "plain", force=True)
    result = adaptrix.compile_adapter(adapter, target, "hooks", tmp / "distilled", passes=[spec], force=True)
    report = json.loads((result.out / "manifest.json").read_text())["passes"][0]["report"]
    assert report["sequences"] == 48 and report["answer_tokens"] == 48 * GENERATE
    assert report["kl"]["after"] < 0.2 * report["kl"]["before"]  # measured 0.08
    assert report["agreement"]["after"] > report["agreement"]["before"] + 0.3  # measured 0.22 -> 0.65
    # Measured apart from the pass: PEFT as the teacher, the written bundle as the student.
    prompts = setup.prompt_ids()
    identity, distilled = (
        kl_to_peft("llama", source, target, adapter, prompts, out) for out in (plain.out, result.out)
    )
    assert identity == pytest.approx(report["kl"]["before"], rel=0.05)
    assert distilled == pytest.approx(report["kl"]["after"], rel=0.05)


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox"])
def test_fused_modules_are_trained_and_written_back(family, bases, peft_adapters, tmp_path):
    """c_attn, qkv_proj / gate_up_proj and query_key_value train as one PEFT pair and come back whole."""
    source = bases(family)
    target = build_base(family, tmp_path / "target", seed=5)  # unrelated, head included: little to gain
    adapter = peft_adapters(family)
    prompts = prompts_file(tmp_path / "prompts.json", 32, high=100)
    spec = (
        f"distill:source={source},prompts={tmp_path / 'prompts.json'},generate={GENERATE},steps=40,batch=16"
    )
    result = adaptrix.compile_adapter(adapter, target, "hooks", tmp_path / "out", passes=[spec])
    report = json.loads((result.out / "manifest.json").read_text())["passes"][0]["report"]
    assert report["kl"]["after"] < 0.8 * report["kl"]["before"]  # measured 0.63-0.69
    got = kl_to_peft(family, source, target, adapter, prompts, result.out)
    assert got == pytest.approx(report["kl"]["after"], rel=0.05)


def test_the_same_seed_gives_the_same_adapter(setup):
    source, target, adapter, _, tmp = setup
    spec = f"distill:source={source},prompts={tmp / 'prompts.json'},generate=2,steps=10,batch=16,seed=4"
    outs = [adaptrix.compile_adapter(adapter, target, "hooks", tmp / f"seed-{i}", passes=[spec],
                                     force=True).out for i in range(2)]  # fmt: skip
    first, second = (sorted(p for p in out.iterdir() if p.suffix == ".safetensors") for out in outs)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ("generate=4", "source=DIR"),
        ("source={source},prompts={prompts},steps=0", "steps=0 must be >= 1"),
        ("source={source},prompts={prompts},lr=0", "lr=0.0 must be > 0"),
        ("source={source},prompts={missing}", "cannot be read"),
    ],
)
def test_bad_options_are_clear_errors(options, match, setup):
    source, tmp = setup.source, setup.tmp
    spec = "distill:" + options.format(source=source, prompts=tmp / "prompts.json", missing=tmp / "none.json")
    assert_carry_refused(setup, spec, match)
    assert not (tmp / "err").exists()


def test_an_encoder_is_refused(bases, peft_adapters, tmp_path):
    source = bases("bert")
    adapter = peft_adapters("bert")
    (tmp_path / "prompts.json").write_text("[[5, 6, 7]]")
    spec = f"distill:source={source},prompts={tmp_path / 'prompts.json'}"
    with pytest.raises(AdaptrixError, match="not a causal LM"):
        adaptrix.compile_adapter(adapter, source, "hooks", tmp_path / "out", passes=[spec])


def test_dora_is_refused(setup, peft_adapters):
    assert_dora_refused(setup, peft_adapters, "distill")
