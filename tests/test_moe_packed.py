"""MoE bases as transformers 5 loads them: experts packed in 3-D parameters, routers that are no Linear.

A PEFT 0.22 LoRA on attention, the router and shared experts (target_modules) and on the packed
expert parameters (target_parameters, PEFT's ParamWrapper) compiles to merged (into the
checkpoint's own per-expert tensors) and to hooks (the packed parameter swapped for W + delta
while its module runs), both equal to PEFT's forward in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import FP32_TOLERANCE, TRANSFORMERS_5, load_model, make_adapter, peft_logits, sample_inputs
from safetensors import safe_open
from safetensors.torch import save_file
from test_hooks_parity import check_attach_matches_peft, logits, snapshot

import adaptrix
from adaptrix.ir.errors import AdaptrixError, UnsupportedError

pytestmark = pytest.mark.skipif(
    not TRANSFORMERS_5, reason="transformers 4 keeps experts as Linear modules (tests/test_tree_binder.py)"
)
_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
_SHARED = [
    "shared_expert.gate_proj",
    "shared_expert.up_proj",
    "shared_expert.down_proj",
    "shared_expert_gate",
]
TARGETS = {
    "mixtral": dict(target_modules=["q_proj", "v_proj"], target_parameters=["gate.weight", *_EXPERTS]),
    "qwen2_moe": dict(
        target_modules=["q_proj", "o_proj", *_SHARED], target_parameters=["mlp.gate.weight", *_EXPERTS]
    ),
    "qwen3_moe": dict(target_modules=["k_proj"], target_parameters=["experts.down_proj", "mlp.gate.weight"]),
}


def _keys(path) -> dict[str, list[int]]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            torch.manual_seed(1)
            made[family] = make_adapter(
                family, bases(family), tmp_path_factory.mktemp(family), **TARGETS[family]
            )
        return made[family]

    return get


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_merged_writes_the_checkpoints_expert_tensors_equal_to_peft(family, bases, adapters, tmp_path):
    base, adapter = bases(family), adapters(family)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"]  # PEFT wrapped packed parameters
    adaptrix.compile_adapter(adapter, base, "merged", tmp_path / "merged")
    assert _keys(tmp_path / "merged") == _keys(base)  # per-expert tensors, the checkpoint's names
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    got = load_model(family, tmp_path / "merged")(**inputs).logits.detach()
    assert (got - expected).abs().max() <= FP32_TOLERANCE


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_hooks_swap_packed_parameters_equal_to_peft(family, bases, adapters, tmp_path):
    base, adapter = bases(family), adapters(family)
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    entries = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["bundle"]["modules"]
    assert {e["packed"]["param"] for e in entries if "packed" in e} >= {"weight", "down_proj"}
    check_attach_matches_peft(family, base, adapter, tmp_path / "bundle")


def test_two_bundles_on_one_packed_parameter_add_up_and_restore(bases, adapters, tmp_path):
    """Half the bundle twice is the bundle once; after a forward and after detach, the base is intact."""
    base, adapter = bases("mixtral"), adapters("mixtral")
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    inputs = sample_inputs("mixtral")
    model = load_model("mixtral", base)
    state, base_logits = snapshot(model), logits(model, inputs)
    with adaptrix.attach(model, tmp_path / "bundle"):
        once = logits(model, inputs)
    first = adaptrix.attach(model, tmp_path / "bundle", scale=0.5)
    second = adaptrix.attach(model, tmp_path / "bundle", scale=0.5)
    assert (logits(model, inputs) - once).abs().max() <= FP32_TOLERANCE
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    second.detach()
    first.detach()
    assert torch.equal(logits(model, inputs), base_logits)


def test_a_bundle_without_packing_is_refused_on_a_router_in_one_line(bases, adapters, tmp_path):
    base, adapter = bases("mixtral"), adapters("mixtral")
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    manifest = tmp_path / "bundle" / "manifest.json"
    data = json.loads(manifest.read_text())
    for entry in data["bundle"]["modules"]:
        entry.pop("packed", None)  # as a bundle compiled against per-expert modules (transformers 4)
    manifest.write_text(json.dumps(data))
    with pytest.raises(AdaptrixError) as caught:
        adaptrix.attach(load_model("mixtral", base), tmp_path / "bundle")
    assert "\n" not in str(caught.value) and "does not fit this model" in str(caught.value)


def _packed_base(family: str, base, path):
    """The base saved as transformers 5 holds it in memory: experts packed [E, 2I, H], loaded names."""
    model = load_model(family, base)
    shutil.copytree(base, path)
    tied = model.config.tie_word_embeddings
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()
               if name != "lm_head.weight" or not tied}  # fmt: skip
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in _keys(path)
    return path


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_merged_into_a_packed_checkpoint_writes_each_experts_slice(family, bases, adapters, tmp_path):
    base, adapter = _packed_base(family, bases(family), tmp_path / "packed"), adapters(family)
    adaptrix.compile_adapter(adapter, base, "merged", tmp_path / "merged")
    assert _keys(tmp_path / "merged") == _keys(base)  # packed as it was
    inputs = sample_inputs(family)
    expected = peft_logits(family, bases(family), adapter, inputs)
    got = load_model(family, tmp_path / "merged")(**inputs).logits.detach()
    assert (got - expected).abs().max() <= FP32_TOLERANCE
    with pytest.raises(UnsupportedError) as caught:
        adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    assert "\n" not in str(caught.value) and "packed" in str(caught.value)
