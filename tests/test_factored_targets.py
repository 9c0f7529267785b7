"""LoHa / LoKr as their exact low-rank forms: onnx-cpu --unmerged, AIR and --to peft, hooks bundles.

Each output is checked against PEFT's own LoHa / LoKr forward on the tiny Llama (adapters made
and perturbed as in test_peft_kinds, so that an ignored op cannot pass).
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, model_logits, peft_logits, sample_inputs
from safetensors import safe_open
from safetensors.torch import load_file
from test_onnx_parity import (
    ONNX_FP32_TOLERANCE,
    activate,
    assert_matches,
    base_logits,
    onnx_base,
    prefill,
    session,
)
from test_peft_kinds import FUSED_KINDS, LLAMA_KINDS, perturbed

import adaptrix
from adaptrix.frontends.peft.adapter import load_peft
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.factored_low_rank import form_rank
from adaptrix.ir.values import AdapterIR, Factored, LazyTensor, LowRank
from adaptrix.runtimes.hooks.bundle import TENSORS_FILE
from adaptrix.targets.hooks import write_hooks

KINDS = ("loha", "lokr", "lokr-decompose-both")


@pytest.fixture(scope="module")
def factored(bases, tmp_path_factory):
    """The llama base (with ONNX-friendly special tokens) and one adapter per LoHa / LoKr variant."""
    base, root = onnx_base(bases, "llama"), tmp_path_factory.mktemp("factored")
    return base, {
        kind: perturbed(load_model("llama", base), LLAMA_KINDS[kind], root / kind) for kind in KINDS
    }


@pytest.mark.onnx_export
def test_onnx_unmerged_adapter_files_match_peft(factored, tmp_path):
    base, adapters = factored
    out = tmp_path / "out"
    adaptrix.compile_adapter(list(adapters.values()), base, "onnx-cpu", out, unmerged=True)
    inputs = sample_inputs("llama")
    plain = base_logits("llama", base, inputs)
    sess = session(out)
    ranks = json.loads((out / "manifest.json").read_text())["onnx"]["lora"]["adapters"]
    for kind, adapter in adapters.items():
        expected = peft_logits("llama", base, adapter, inputs)
        got = prefill(sess, inputs, activate(out / "adapters" / f"{kind}.onnx_adapter"))
        assert_matches(got, expected, plain, ONNX_FP32_TOLERANCE)
        assert ranks[kind]["ranks"], kind
    assert ranks["loha"]["ranks"]["model.layers.0.mlp.gate_proj"] == 4 * 4  # r1 * r2


@pytest.mark.parametrize("kind", KINDS)
def test_air_then_peft_is_a_lora_adapter_with_the_same_outputs(kind, factored, tmp_path):
    base, adapters = factored
    air, back = tmp_path / f"{kind}.air.safetensors", tmp_path / "back"
    adaptrix.convert_adapter(adapters[kind], "air", air, base=base)
    with safe_open(str(air), "pt") as handle:
        metadata = handle.metadata()
    ops = json.loads(metadata["ops"])
    assert metadata["format_version"] == "1" and {op["op"] for op in ops} == {"lora"}
    provenance = json.loads(metadata["provenance"])
    forms = {(f["layer"], f["role"]): f for f in provenance["low_rank_forms"]}
    assert forms.keys() == {(op["layer"], op["role"]) for op in ops}
    assert all(f["from"] == kind[:4] and f["rank"] == op["rank"] for op in ops
               for f in [forms[(op["layer"], op["role"])]])  # fmt: skip
    adaptrix.convert_adapter(air, "peft", back, base=base)
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapters[kind], inputs)
    assert (model_logits("llama", base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    got = peft_logits("llama", base, back, inputs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= FP32_TOLERANCE


def test_peft_to_peft_directly(factored, tmp_path):
    base, adapters = factored
    adaptrix.convert_adapter(adapters["loha"], "peft", tmp_path / "back", base=base)
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapters["loha"], inputs)
    assert (peft_logits("llama", base, tmp_path / "back", inputs) - expected).abs().max() <= FP32_TOLERANCE


def test_hooks_bundle_keeps_a_pair_where_it_is_smaller(factored, tmp_path):
    """LoHa r=4 (form rank 16) on llama: [64, 32] / [32, 64] MLP modules get a pair, q / v stay dense."""
    base, adapters = factored
    adaptrix.compile_adapter(adapters["loha"], base, "hooks", tmp_path / "bundle")
    section = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["bundle"]
    stored = {entry["name"].rpartition(".")[2]: entry for entry in section["modules"]}
    for name in ("gate_proj", "down_proj"):
        assert stored[name]["lora"]["rank"] == 16 and "dense" not in stored[name], name
    for name in ("q_proj", "v_proj"):  # 16 * (32 + 32) = 32 * 32: not smaller
        assert stored[name]["lora"] is None and "dense" in stored[name], name


def test_hooks_pair_of_lora_beside_loha_is_their_sum(factored, tmp_path):
    """A LoRA op and a LoHa op on one module: one pair, ranks concatenated, scales folded into up."""
    base, adapters = factored
    checkpoint = Checkpoint(base)
    ir = load_peft(adapters["loha"], checkpoint)
    site, loha = next((s, op) for s, op in ir if isinstance(op, Factored) and s.role == "mlp_gate")
    generator = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 32, generator=generator), torch.randn(64, 2, generator=generator)
    lora = LowRank(LazyTensor.of(a, "test:A"), LazyTensor.of(b, "test:B"), 0.75)
    both = AdapterIR(((site, loha), (site, lora)), ir.source, ir.name)
    written = write_hooks(both, checkpoint, tmp_path)
    [entry] = written.manifest["bundle"]["modules"]
    assert entry["lora"]["rank"] == form_rank(loha) + 2 and "dense" not in entry
    tensors = load_file(str(tmp_path / TENSORS_FILE))
    got = (tensors[entry["lora"]["down"]].double() @ tensors[entry["lora"]["up"]].double()).T
    expected = loha.delta().double() + lora.delta().double()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("case", ["phi3-loha", "neox-lokr"])
def test_fused_modules_convert_to_one_lora_pair_each(case, bases, tmp_path):
    """Phi-3's blocked qkv / gate_up, GPT-NeoX's per-head query_key_value: roles share one A again."""
    family, config = FUSED_KINDS[case]
    base = bases(family)
    adapter = perturbed(load_model(family, base), config, tmp_path / "adapter")
    air = tmp_path / "a.air.safetensors"
    adaptrix.convert_adapter(adapter, "air", air, base=base)
    with safe_open(str(air), "pt") as handle:
        keys = set(handle.keys())
    first = "layers.0.attn_q.lora_A"
    assert first in keys and not {"layers.0.attn_k.lora_A", "layers.0.attn_v.lora_A"} & keys  # A stored once
    adaptrix.convert_adapter(air, "peft", tmp_path / "back", base=base)
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    got = peft_logits(family, base, tmp_path / "back", inputs)
    assert (got - expected).abs().max() <= FP32_TOLERANCE
