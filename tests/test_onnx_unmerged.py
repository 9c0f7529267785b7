"""onnx-cpu --unmerged and --quantize: swappable adapter files and quantized graphs, against PEFT.

One compile per family takes three adapters that differ in rank, targets and alpha, one with
rsLoRA and one with rank_pattern / alpha_pattern, so that every per-module scale folded into
the adapter files is exercised. Also: the option errors of the ONNX targets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from builders import FAMILIES, load_model, make_adapter, peft_logits, sample_inputs
from peft import PeftModel
from test_errors import assert_refused
from test_onnx_parity import (
    ONNX_FP32_TOLERANCE,
    activate,
    assert_matches,
    base_logits,
    genai_tokens,
    max_diff,
    optimum_tokens,
    peft_tokens,
    positions_of,
    prefill,
    prompt_of,
    seeded_adapter,
    session,
    step,
)
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app

# Relative Frobenius error of quantized logits against the float32 graph's. Hidden size 32 makes
# every weight row one block (and one int8-dynamic scale); measured on llama: int8-dynamic 0.037
# merged on an AVX512-VNNI CPU, 0.070 on an AVX2 one (u8s8 pairs saturate in int16), <= 0.02
# unmerged; int8 (symmetric blocks) 0.034 merged on the AVX2 one; int4 (asymmetric) 0.25
# merged, <= 0.17 unmerged (the LoRA branch stays float32).
QUANTIZED_TOLERANCE = {"int8": 0.06, "int4": 0.4, "int8-dynamic": 0.1}
QUANTIZED_OPS = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int8-dynamic": "DynamicQuantizeMatMul"}
SCHEMES = list(QUANTIZED_OPS)


def lora_variants(family: str) -> dict[str, dict]:
    """Adapter name -> make_adapter keywords: plain, rsLoRA on other targets, per-module patterns."""
    targets = list(FAMILIES[family].targets)
    return {
        "plain": {"seed": 1},
        "rslora": {"seed": 2, "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": targets[-2:]},
        "pattern": {"seed": 3, "rank_pattern": {targets[0]: 2}, "alpha_pattern": {targets[-1]: 3}},
    }


@dataclass(frozen=True)
class Unmerged:
    """A base, its adapters by name and one unmerged output holding them all."""

    family: str
    base: Path
    adapters: dict[str, Path]
    out: Path

    def adapter_file(self, name: str) -> Path:
        return self.out / "adapters" / f"{name}.onnx_adapter"


def compile_unmerged(
    family, base, root: Path, adapters: dict[str, Path] | None = None, **options
) -> Unmerged:
    """Compile the adapters (made here unless given) into one unmerged output under `root`."""
    adapters = adapters or {name: seeded_adapter(family, base, root / name, **kwargs)
                            for name, kwargs in lora_variants(family).items()}  # fmt: skip
    out = root / "out"
    compile_adapter(list(adapters.values()), base, "onnx-cpu", out, options={"unmerged": True, **options})
    return Unmerged(family, base, adapters, out)


@pytest.fixture(scope="module")
def unmerged(bases, tmp_path_factory):
    """One unmerged onnx-cpu output per family, compiled on first use."""
    made: dict[str, Unmerged] = {}

    def get(family: str) -> Unmerged:
        if family not in made:
            made[family] = compile_unmerged(
                family, bases(family), tmp_path_factory.mktemp(f"unmerged-{family}")
            )
        return made[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_adapter_file_matches_peft_and_none_is_the_base(family, unmerged):
    case = unmerged(family)
    inputs = sample_inputs(family)
    base = base_logits(family, case.base, inputs)
    sess = session(case.out)
    assert max_diff(prefill(sess, inputs), base) <= ONNX_FP32_TOLERANCE
    for name, adapter in case.adapters.items():
        expected = peft_logits(family, case.base, adapter, inputs)
        got = prefill(sess, inputs, activate(case.adapter_file(name)))
        assert_matches(got, expected, base, ONNX_FP32_TOLERANCE)
    assert max_diff(prefill(sess, inputs), base) <= ONNX_FP32_TOLERANCE  # nothing stays active


@pytest.mark.parametrize("family", ["gpt_neox", "phi3"])
def test_manifest_lists_the_adapter_files(family, unmerged):
    """Files, hashes and ranks as written; a fused module (query_key_value, qkv_proj) has one pair."""
    case = unmerged(family)
    manifest = json.loads((case.out / "manifest.json").read_text())
    lora = manifest["onnx"]["lora"]
    assert set(lora["adapters"]) == set(case.adapters) and lora["dtype"] == "float32"
    for name, entry in lora["adapters"].items():
        file = case.out / entry["file"]
        assert file == case.adapter_file(name) and entry["file"] in manifest["files"]
        assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    fused = next(
        module for module in lora["adapters"]["pattern"]["ranks"] if "qkv" in module or "query" in module
    )
    assert lora["adapters"]["pattern"]["ranks"][fused] == 2  # rank_pattern reached the fused module
    graph = onnx.load(case.out / "model.onnx", load_external_data=False).graph
    inputs = {value.name for value in graph.input}
    assert set(lora["inputs"]) <= inputs and not set(lora["inputs"]) & set(manifest["onnx"]["inputs"])
    assert {f"{fused}.lora_A", f"{fused}.lora_B"} <= set(lora["inputs"])


def test_decode_step_with_an_adapter_matches_peft(unmerged):
    case = unmerged("llama")
    ids = sample_inputs("llama")["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    positions = positions_of(mask)
    adapter = case.adapters["rslora"]
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_model("llama", case.base), adapter).eval()
        expected = peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    sess, options = session(case.out), activate(case.adapter_file("rslora"))
    first = step(sess, ids[:, :-1], mask[:, :-1], positions[:, :-1], run_options=options)
    last = step(sess, ids[:, -1:], mask, positions[:, -1:], past=first, run_options=options)
    assert max_diff(torch.from_numpy(last["logits"])[:, -1], expected) <= ONNX_FP32_TOLERANCE


def test_genai_and_optimum_generate_peft_tokens_with_each_adapter(unmerged):
    """og.Adapters and ORTModelForCausalLM (RunOptions passed to its session) switch adapters."""
    case = unmerged("llama")
    prompt = prompt_of("llama")
    base = peft_tokens("llama", case.base, None, prompt)
    assert genai_tokens(case.out, prompt) == base
    for name, adapter in case.adapters.items():
        expected = peft_tokens("llama", case.base, adapter, prompt)
        assert expected != base, name
        assert genai_tokens(case.out, prompt, case.adapter_file(name)) == expected, name
        assert optimum_tokens(case.out, prompt, activate(case.adapter_file(name))) == expected, name


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - reference) / torch.linalg.norm(reference))


def op_types(out: Path) -> list[str]:
    return [node.op_type for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_merged_output_stays_near_float32(scheme, bases, tmp_path):
    base = bases("llama")
    adapter = seeded_adapter("llama", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "fp32")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / scheme, options={"quantize": scheme})
    section = json.loads((tmp_path / scheme / "manifest.json").read_text())["onnx"]
    blocks = None if scheme == "int8-dynamic" else 32
    assert section["quantize"] == scheme and section.get("block_size") == blocks
    assert QUANTIZED_OPS[scheme] in op_types(tmp_path / scheme)
    inputs = sample_inputs("llama")
    reference = prefill(session(tmp_path / "fp32"), inputs)
    got = prefill(session(tmp_path / scheme), inputs)
    error = relative_error(got, reference)
    assert error <= QUANTIZED_TOLERANCE[scheme], error
    assert error <= 0.25 * relative_error(base_logits("llama", base, inputs), reference)  # the adapter shows
    graph = onnx.load(tmp_path / scheme / "model.onnx", load_external_data=False).graph
    node = next(node for node in graph.node if node.op_type == QUANTIZED_OPS[scheme])
    dims = {init.name: list(init.dims) for init in graph.initializer}
    if scheme == "int8-dynamic":  # one scale, zero point 0 (see quantize_schemes._int8: per column saturates)
        assert dims[node.input[2]] == dims[node.input[3]] == []
        return
    n, blocks, packed = dims[node.input[1]]
    bits = {a.name: a.i for a in node.attribute}["bits"]
    assert packed == 32 * bits // 8 and dims[node.input[2]] == [n, blocks]
    if scheme == "int4":  # asymmetric blocks: zero points, two per byte
        assert dims[node.input[3]] == [n, (blocks + 1) // 2]
    else:  # symmetric int8 blocks: no zero points
        assert len(node.input) == 3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_unmerged_graph_still_takes_adapter_files(scheme, unmerged, tmp_path):
    """The base's MatMuls are quantized; the LoRA branches stay float MatMuls fed by the files."""
    reference = unmerged("llama")
    case = compile_unmerged("llama", reference.base, tmp_path, reference.adapters, quantize=scheme)
    lora = json.loads((case.out / "manifest.json").read_text())["onnx"]["lora"]
    graph = onnx.load(case.out / "model.onnx", load_external_data=False).graph
    assert {n.op_type for n in graph.node if set(n.input) & set(lora["inputs"])} == {"MatMul"}
    assert set(lora["inputs"]) <= {value.name for value in graph.input}
    assert QUANTIZED_OPS[scheme] in op_types(case.out)
    inputs = sample_inputs("llama")
    quantized, full = session(case.out), session(reference.out)
    for name in case.adapters:
        got = prefill(quantized, inputs, activate(case.adapter_file(name)))
        expected = prefill(full, inputs, activate(reference.adapter_file(name)))
        error = relative_error(got, expected)
        assert error <= QUANTIZED_TOLERANCE[scheme], (name, error)
        assert error <= 0.25 * relative_error(prefill(quantized, inputs), expected), name


# Each case: (adapters, target, extra CLI args, what the one-line message must name).
REFUSED = {
    "bf16": (["plain"], "onnx-cpu", ["--dtype", "bf16"], "bfloat16"),
    "dora-unmerged": (["dora"], "onnx-cpu", ["--unmerged"], "DoRA"),
    "quantize-merged-target": (["plain"], "merged", ["--quantize", "int8"], "--quantize"),
    "quantize-onnx-cuda": (["plain"], "onnx-cuda", ["--quantize", "int8"], "--quantize"),
    "two-without-unmerged": (["plain", "second"], "onnx-cpu", [], "--unmerged"),
    "unknown-quantize": (["plain"], "onnx-cpu", ["--quantize", "int3"], "int3"),
    "block-size": (["plain"], "onnx-cpu", ["--quantize", "int4", "--block-size", "48"], "48"),
    "block-size-unblocked": (
        ["plain"],
        "onnx-cpu",
        ["--quantize", "int8-dynamic", "--block-size", "64"],
        "--block-size",
    ),
}


@pytest.fixture(scope="module")
def refusal_adapters(bases, tmp_path_factory):
    base = bases("llama")
    root = tmp_path_factory.mktemp("onnx-refused")
    made = {"plain": make_adapter("llama", base, root / "plain"),
            "second": make_adapter("llama", base, root / "second", seed=4),
            "dora": make_adapter("llama", base, root / "dora", use_dora=True)}  # fmt: skip
    return base, made


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_options_are_refused(case, refusal_adapters, tmp_path):
    """Exit 2, one line, nothing at -o, and no export started (the check comes first)."""
    from adaptrix.targets.onnx import export

    names, target, extra, named = REFUSED[case]
    base, made = refusal_adapters
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["compile", *(str(made[name]) for name in names), "--base", str(base), "-o", str(out),
            "--target", target, *extra]  # fmt: skip
    if target != "merged":  # a fresh cache: an export started before the check would show there
        args += ["--cache-dir", str(cache)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "_export", _no_export)
        result = CliRunner().invoke(app, args)
    assert_refused(result, out, named)
    assert not cache.exists()


def _no_export(*args, **kwargs):
    raise AssertionError("a refused compile started an export")


def test_block_size_reaches_the_int4_quantizer(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    compile_adapter(
        adapter, base, "onnx-cpu", tmp_path / "out", options={"quantize": "int4", "block_size": 16}
    )
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    blocks = {
        a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"
    }
    assert blocks == {16}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["onnx"]["block_size"] == 16
    assert prefill(session(tmp_path / "out"), sample_inputs("llama")).isfinite().all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_takes_gpt2_conv1d_projections(scheme, bases, tmp_path):
    """GPT-2's Conv1D layers export as Gemm with a bias; each scheme quantizes them too, bias kept."""
    base = bases("gpt2")
    adapter = seeded_adapter("gpt2", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "fp32")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / scheme, options={"quantize": scheme})
    ops = op_types(tmp_path / scheme)
    assert ops.count(QUANTIZED_OPS[scheme]) >= 4 * FAMILIES["gpt2"].config_kwargs["n_layer"]
    assert "Gemm" not in ops
    inputs = sample_inputs("gpt2")
    reference = prefill(session(tmp_path / "fp32"), inputs)
    error = relative_error(prefill(session(tmp_path / scheme), inputs), reference)
    assert error <= QUANTIZED_TOLERANCE[scheme], error
