"""onnx-cpu --unmerged and --quantize: swappable adapter files and quantized graphs, against PEFT.

One compile per family takes three adapters that differ in rank, targets and alpha, one with
rsLoRA and one with rank_pattern / alpha_pattern, so that every per-module scale folded into
the adapter files is exercised. Also: the option errors of the ONNX targets.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import onnx
import pytest
import torch
from builders import FAMILIES, ONNX_FAMILIES, sample_inputs
from onnx_builders import (
    Unmerged,
    assert_decode_step_matches_peft,
    assert_each_file_matches_peft,
    compile_unmerged,
)
from test_errors import assert_refused
from test_onnx_parity import (
    activate,
    base_logits,
    genai_tokens,
    optimum_tokens,
    peft_tokens,
    prefill,
    prompt_of,
    seeded_adapter,
    session,
)
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app

pytestmark = pytest.mark.onnx_export

# Relative Frobenius error of quantized logits against the float32 graph's. Hidden size 32 makes
# every weight row one block (and one int8-dynamic scale); measured on llama: int8-dynamic 0.037
# merged on an AVX512-VNNI CPU, 0.070 on an AVX2 one (u8s8 pairs saturate in int16), <= 0.02
# unmerged; int8 (symmetric blocks) 0.034 merged on the AVX2 one; int4 (asymmetric) 0.25
# merged, <= 0.17 unmerged (the LoRA branch stays float32).
QUANTIZED_TOLERANCE = {"int8": 0.06, "int4": 0.4, "int4-sym": 0.4, "int8-dynamic": 0.1}
QUANTIZED_OPS = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int4-sym": "MatMulNBits",
                 "int8-dynamic": "DynamicQuantizeMatMul"}  # fmt: skip
SCHEMES = list(QUANTIZED_OPS)


def lora_variants(family: str) -> dict[str, dict]:
    """Adapter name -> make_adapter keywords: plain, rsLoRA on other targets, per-module patterns."""
    targets = list(FAMILIES[family].targets)
    return {
        "plain": {"seed": 1},
        "rslora": {"seed": 2, "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": targets[-2:]},
        "pattern": {"seed": 3, "rank_pattern": {targets[0]: 2}, "alpha_pattern": {targets[-1]: 3}},
    }


@pytest.fixture(scope="module")
def unmerged(bases, tmp_path_factory):
    """One unmerged onnx-cpu output of the lora_variants per family, compiled on first use."""

    @functools.cache
    def get(family: str) -> Unmerged:
        root, base = tmp_path_factory.mktemp(f"unmerged-{family}"), bases(family)
        adapters = {name: seeded_adapter(family, base, root / name, **kwargs)  # its name: the folder's
                    for name, kwargs in lora_variants(family).items()}  # fmt: skip
        return compile_unmerged(family, base, adapters, root / "out")

    return get


@pytest.fixture(scope="module")
def float32_merged(bases, peft_adapters, tmp_path_factory):
    """(base, adapter, its float32 merged onnx-cpu output) per family, compiled on first use."""

    @functools.cache
    def get(family: str) -> tuple[Path, Path, Path]:
        base, adapter = bases(family), peft_adapters(family)
        out = compile_adapter(
            adapter, base, "onnx-cpu", tmp_path_factory.mktemp(f"fp32-{family}") / "fp32"
        ).out
        return base, adapter, out

    return get


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_each_adapter_file_matches_peft_and_none_is_the_base(family, unmerged):
    assert_each_file_matches_peft(unmerged(family))


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
    assert_decode_step_matches_peft(unmerged("llama"), "rslora")


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
def test_quantized_merged_output_stays_near_float32(scheme, float32_merged, tmp_path):
    base, adapter, fp32 = float32_merged("llama")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / scheme, quantize=scheme)
    section = json.loads((tmp_path / scheme / "manifest.json").read_text())["onnx"]
    blocks = None if scheme == "int8-dynamic" else 32
    assert section["quantize"] == scheme and section.get("block_size") == blocks
    assert QUANTIZED_OPS[scheme] in op_types(tmp_path / scheme)
    inputs = sample_inputs("llama")
    reference = prefill(session(fp32), inputs)
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
    else:  # symmetric int8 / int4-sym blocks: no zero points (MatMulNBits' default: 128 / 8)
        assert len(node.input) == 3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_unmerged_graph_still_takes_adapter_files(scheme, unmerged, tmp_path):
    """The base's MatMuls are quantized; the LoRA branches stay float MatMuls fed by the files."""
    reference = unmerged("llama")
    case = compile_unmerged("llama", reference.base, reference.adapters, tmp_path / "out", quantize=scheme)
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
def refusal_adapters(bases, peft_adapters):
    made = {"plain": peft_adapters("llama"), "second": peft_adapters("llama", seed=4),
            "dora": peft_adapters("llama", use_dora=True)}  # fmt: skip
    return bases("llama"), made


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


def test_block_size_reaches_the_int4_quantizer(bases, peft_adapters, tmp_path):
    base = bases("llama")
    adapter = peft_adapters("llama")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", quantize="int4", block_size=16)
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    blocks = {
        a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"
    }
    assert blocks == {16}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["onnx"]["block_size"] == 16
    assert prefill(session(tmp_path / "out"), sample_inputs("llama")).isfinite().all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_takes_gpt2_conv1d_projections(scheme, float32_merged, tmp_path):
    """GPT-2's Conv1D layers export as Gemm with a bias; each scheme quantizes them too, bias kept."""
    base, adapter, fp32 = float32_merged("gpt2")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / scheme, quantize=scheme)
    ops = op_types(tmp_path / scheme)
    assert ops.count(QUANTIZED_OPS[scheme]) >= 4 * FAMILIES["gpt2"].config_kwargs["n_layer"]
    assert "Gemm" not in ops
    inputs = sample_inputs("gpt2")
    reference = prefill(session(fp32), inputs)
    error = relative_error(prefill(session(tmp_path / scheme), inputs), reference)
    assert error <= QUANTIZED_TOLERANCE[scheme], error
