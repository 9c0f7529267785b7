"""AIR: PEFT -> AIR -> PEFT computes what the source computes, AIR compiles like its source,
moves between families of the same dimensions, and broken AIR files are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, make_adapter, model_logits, peft_logits, sample_inputs
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix import compile_adapter, convert_adapter
from adaptrix.cli import app
from adaptrix.frontends.air.adapter import read_air
from adaptrix.io.air_format import FILE_NAME
from adaptrix.ir.values import Bias, DoRA, LowRank

ROUND_TRIP = 1e-5  # max |diff| of logits, float32
# PEFT's unmerged forward against a reference with merged weights rounds differently (seen: 7e-6):
# there the project's merged-vs-PEFT bound applies.
UNMERGED = FP32_TOLERANCE
# The Llama-family base with GPT-2's tiny dimensions (4 heads, no GQA, intermediate 4 * hidden).
GPT2_SIZED_LLAMA = dict(num_key_value_heads=4, intermediate_size=128)

# (case id, family, LoraConfig keyword arguments)
ROUND_TRIPS = [
    ("llama-patterns", "llama",
     dict(rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32})),
    ("llama-rslora", "llama", dict(use_rslora=True, r=8, lora_alpha=4, rank_pattern={"o_proj": 3})),
    ("gpt2-fused-c_attn", "gpt2",
     dict(use_rslora=True, rank_pattern={"c_attn": 6}, alpha_pattern={"c_fc": 3})),
    ("gpt_neox-headwise-qkv", "gpt_neox", dict(use_rslora=True, rank_pattern={"query_key_value": 2})),
    ("phi3-fused-qkv-gate-up", "phi3",
     dict(use_rslora=True, rank_pattern={"qkv_proj": 6}, alpha_pattern={"gate_up_proj": 5})),
    ("phi3-dora", "phi3", dict(use_dora=True, rank_pattern={"gate_up_proj": 2})),
    ("gpt2-bias-all-and-saved-norm", "gpt2", dict(bias="all", modules_to_save=["ln_f"])),
    ("llama-embedding-and-head", "llama", dict(target_modules=["embed_tokens", "lm_head", "q_proj"])),
    ("gpt2-dora-embedding-tied", "gpt2", dict(use_dora=True, target_modules=["wte", "lm_head", "c_attn"])),
    ("gpt_neox-one-layer", "gpt_neox", dict(layers_to_transform=0)),
]  # fmt: skip

runner = CliRunner()


def cli(*args: object):
    """Run the CLI; it must succeed."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def deltas(air: Path) -> dict[tuple, torch.Tensor]:
    """Each op's dense weight delta (with its magnitude), bias delta or new values, by site and kind."""
    found = {}
    for site, op in read_air(air).ops:
        if isinstance(op, LowRank):
            value = op.delta()
        elif isinstance(op, DoRA):
            value = torch.cat([op.low_rank.delta().reshape(-1), op.magnitude.load()])
        elif isinstance(op, Bias):
            value = op.delta.load()
        else:
            value = torch.cat([t.load().reshape(-1) for _, t in sorted(op.tensors.items())])
        found[(site, type(op).__name__)] = value
    return found


@pytest.mark.parametrize(("family", "lora"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_peft_air_peft_round_trip_matches_peft(family, lora, bases, tmp_path):
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter", **lora)
    air, back = tmp_path / "adapter.air.safetensors", tmp_path / "back"
    cli("convert", adapter, "--to", "air", "-o", air, "--base", base)
    cli("convert", air, "--to", "peft", "-o", back, "--base", base)
    written = ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert sorted(p.name for p in back.iterdir()) == written
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    got = peft_logits(family, base, back, inputs)
    assert (model_logits(family, base, inputs) - expected).abs().max() > 1e-2  # the adapter matters
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ROUND_TRIP
    # Converting the written PEFT adapter again describes the same deltas.
    again = tmp_path / "again.air.safetensors"
    cli("convert", back, "--to", "air", "-o", again, "--base", base)
    first, second = deltas(air), deltas(again)
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], rtol=1e-6, atol=1e-7) for k in first)


def test_air_file_layout_and_metadata(bases, tmp_path):
    """Keys by layer and role; a fused module's shared A stored once; metadata as docs/air.md says."""
    base = bases("gpt2")
    adapter = make_adapter("gpt2", base, tmp_path / "adapter", target_modules=["c_attn", "c_fc"], r=4)
    air = tmp_path / "a.air.safetensors"
    convert_adapter(adapter, "air", air)  # no --base: the adapter's own base_model_name_or_path
    with safe_open(str(air), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "layers.0.attn_q.lora_A" in keys and "layers.1.mlp_up.lora_B" in keys
    assert {"layers.0.attn_k.lora_A", "layers.0.attn_v.lora_A"}.isdisjoint(keys)  # shared A: once
    assert {"layers.0.attn_k.lora_B", "layers.0.attn_v.lora_B"} <= keys
    assert metadata["format"] == "adaptrix-air" and metadata["format_version"] == "1"
    assert json.loads(metadata["source"])["arch"] == "gpt2"
    ops = json.loads(metadata["ops"])
    k_op = next(op for op in ops if (op["layer"], op["role"]) == (0, "attn_k"))
    assert k_op == {"layer": 0, "role": "attn_k", "op": "lora", "rank": 4, "scale": 2.0,
                    "tensors": {"A": "layers.0.attn_q.lora_A", "B": "layers.0.attn_k.lora_B"}}  # fmt: skip
    provenance = json.loads(metadata["provenance"])
    assert provenance["adapter_format"] == "peft-lora" and Path(provenance["base"]) == base.absolute()
    assert set(provenance["adapter_files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    back = convert_adapter(air, "peft", tmp_path / "back", base=base).out  # c_attn: one pair again
    written = load_file(back / "adapter_model.safetensors")
    assert written["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    report = json.loads(cli("inspect", air, "--json").stdout)
    assert report["format"] == "air" and report["layers"] == [0, 1]
    assert {"attn_q", "attn_k", "attn_v", "mlp_up"} == set(report["roles"])


@pytest.mark.parametrize(("family", "lora"), [("phi3", dict(use_rslora=True)), ("gpt2", dict(bias="all"))])
def test_compiling_air_equals_compiling_peft(family, lora, bases, tmp_path):
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter", **lora)
    folder = tmp_path / "air-dir"
    folder.mkdir()
    convert_adapter(adapter, "air", folder / FILE_NAME, base=base)
    compile_adapter(adapter, base, "merged", tmp_path / "from-peft")
    cli("compile", folder / FILE_NAME, "--base", base, "--target", "merged", "-o", tmp_path / "from-air")
    compile_adapter(folder, base, "merged", tmp_path / "from-air-dir")  # a directory holding the file
    expected = load_file(tmp_path / "from-peft" / "model.safetensors")
    for out in ("from-air", "from-air-dir"):
        got = load_file(tmp_path / out / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    manifest = json.loads((tmp_path / "from-air" / "manifest.json").read_text())
    assert list(manifest["inputs"]["adapter"]["files"]) == [FILE_NAME]


@torch.no_grad()
def llama_with_gpt2_deltas(gpt2_base: Path, adapter: Path, llama_base: Path, inputs: dict) -> torch.Tensor:
    """The reference: the Llama base with each GPT-2 module's PEFT delta added to the same role."""
    gpt2 = PeftModel.from_pretrained(load_model("gpt2", gpt2_base), adapter).base_model.model
    llama = load_model("llama", llama_base)
    for block, layer in zip(gpt2.transformer.h, llama.model.layers, strict=True):
        qkv = block.attn.c_attn.get_delta_weight("default").T  # Conv1D [in, out] -> [out, in]
        q, k, v = qkv.split(qkv.shape[0] // 3)
        attn, mlp = layer.self_attn, layer.mlp
        pairs = [(attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                 (attn.o_proj, block.attn.c_proj.get_delta_weight("default").T),
                 (mlp.up_proj, block.mlp.c_fc.get_delta_weight("default").T),
                 (mlp.down_proj, block.mlp.c_proj.get_delta_weight("default").T)]  # fmt: skip
        for module, delta in pairs:
            module.weight += delta
    return llama(**inputs).logits


def test_air_from_gpt2_applies_to_a_llama_base_of_the_same_dimensions(bases, tmp_path):
    gpt2_base, llama_base = bases("gpt2"), bases("llama", "gpt2-sized", **GPT2_SIZED_LLAMA)
    adapter = make_adapter("gpt2", gpt2_base, tmp_path / "adapter", use_rslora=True)
    air = tmp_path / "gpt2.air.safetensors"
    cli("convert", adapter, "--to", "air", "-o", air)
    inputs = sample_inputs("llama")
    expected = llama_with_gpt2_deltas(gpt2_base, adapter, llama_base, inputs)
    assert (model_logits("llama", llama_base, inputs) - expected).abs().max() > 1e-2
    compile_adapter(air, llama_base, "merged", tmp_path / "merged")
    assert (model_logits("llama", tmp_path / "merged", inputs) - expected).abs().max() <= ROUND_TRIP
    cli("convert", air, "--to", "peft", "-o", tmp_path / "llama-peft", "--base", llama_base)
    config = json.loads((tmp_path / "llama-peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
    got = peft_logits("llama", llama_base, tmp_path / "llama-peft", inputs)
    assert (got - expected).abs().max() <= UNMERGED


@torch.no_grad()
def phi3_with_llama_deltas(llama_base: Path, adapter: Path, phi3_base: Path, inputs: dict) -> torch.Tensor:
    """The reference: the Phi-3 base with each Llama module's PEFT delta added to its rows of Phi-3's."""
    llama = PeftModel.from_pretrained(load_model("llama", llama_base), adapter).base_model.model
    phi3 = load_model("phi3", phi3_base)
    for source, layer in zip(llama.model.layers, phi3.model.layers, strict=True):
        attn, mlp = source.self_attn, source.mlp
        qkv = [m.get_delta_weight("default") for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        gate_up = [m.get_delta_weight("default") for m in (mlp.gate_proj, mlp.up_proj)]
        layer.self_attn.qkv_proj.weight += torch.cat(qkv)  # blocked [q | k | v] with the GQA sizes
        layer.self_attn.o_proj.weight += attn.o_proj.get_delta_weight("default")
        layer.mlp.gate_up_proj.weight += torch.cat(gate_up)
        layer.mlp.down_proj.weight += mlp.down_proj.get_delta_weight("default")
    return phi3(**inputs).logits


def test_separate_projections_onto_fused_ones_concatenate_ranks(bases, tmp_path):
    """Llama's q/k/v (own A's, ranks, scales) onto Phi-3's qkv_proj: one pair of the summed rank."""
    llama_base, phi3_base = bases("llama"), bases("phi3")
    lora = dict(rank_pattern={"q_proj": 8, "gate_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True)
    adapter = make_adapter("llama", llama_base, tmp_path / "adapter", **lora)
    air = tmp_path / "llama.air.safetensors"
    convert_adapter(adapter, "air", air)
    inputs = sample_inputs("phi3")
    expected = phi3_with_llama_deltas(llama_base, adapter, phi3_base, inputs)
    assert (model_logits("phi3", phi3_base, inputs) - expected).abs().max() > 1e-2
    compile_adapter(air, phi3_base, "merged", tmp_path / "merged")
    assert (model_logits("phi3", tmp_path / "merged", inputs) - expected).abs().max() <= ROUND_TRIP
    convert_adapter(air, "peft", tmp_path / "phi3-peft", base=phi3_base)
    config = json.loads((tmp_path / "phi3-peft" / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "phi3-peft" / "adapter_model.safetensors")
    qkv_a = weights["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]
    assert qkv_a.shape == (8 + 4 + 4, 32) and config["rank_pattern"]
    got = peft_logits("phi3", phi3_base, tmp_path / "phi3-peft", inputs)
    assert (got - expected).abs().max() <= UNMERGED


@pytest.mark.parametrize(
    ("targets", "named"),
    [(["c_attn"], ["layer 0 attn_q", "4 heads (4 kv)", "(2 kv)"]),
     (["c_fc"], ["layer 0 mlp_up", "[128, 4]", "[64, 4]"])],
    ids=["kv-heads", "intermediate-size"],
)  # fmt: skip
def test_air_onto_other_dimensions_is_refused(targets, named, bases, tmp_path):
    adapter = make_adapter("gpt2", bases("gpt2"), tmp_path / "adapter", target_modules=targets)
    air = tmp_path / "gpt2.air.safetensors"
    convert_adapter(adapter, "air", air)
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(air), "--base", str(bases("llama")), "-o", str(out)])
    line = assert_refused(result, out, air)
    assert all(text in line for text in named), line


@pytest.fixture(scope="module")
def valid_air(bases, tmp_path_factory):
    """A llama base and a valid AIR file made from a LoRA adapter for it."""
    base, tmp = bases("llama"), tmp_path_factory.mktemp("air")
    air = tmp / "valid.air.safetensors"
    convert_adapter(make_adapter("llama", base, tmp / "adapter"), "air", air, base=base)
    return base, air


def _rewrite(air: Path, out: Path, edit) -> Path:
    """A copy of `air` with `edit(tensors, metadata)` applied."""
    tensors = load_file(air)
    with safe_open(str(air), "pt") as handle:
        metadata = dict(handle.metadata())
    edit(tensors, metadata)
    save_file(tensors, out, metadata=metadata)
    return out


def _meta(key, value):
    return lambda tensors, metadata: metadata.__setitem__(key, value)


def _json_meta(key, change):
    def edit(tensors, metadata):
        value = json.loads(metadata[key])
        change(value)
        metadata[key] = json.dumps(value)

    return edit


def _tensor(key, change):
    return lambda tensors, metadata: tensors.__setitem__(key, change(tensors[key]))


def _poison(value):
    return _tensor(
        "layers.0.attn_q.lora_A", lambda t: t.flatten().index_fill(0, torch.tensor([3]), value).view_as(t)
    )


BROKEN = {
    "wrong-version": _meta("format_version", "2"),
    "version-not-a-number": _meta("format_version", "one"),
    "not-air-metadata": lambda tensors, metadata: metadata.clear(),
    "metadata-key-missing": lambda tensors, metadata: metadata.pop("source"),
    "metadata-key-unknown": _meta("comment", "hello"),
    "ops-not-json": _meta("ops", "[{"),
    "source-field-missing": _json_meta("source", lambda s: s.pop("hidden_size")),
    "source-decoder-start-too-deep": _json_meta("source", lambda s: s.__setitem__("decoder_start", 2)),
    # an encoder-decoder's AIR (layer 1 is its decoder's) onto a base of one stack
    "source-decoder-start-not-the-base": _json_meta("source", lambda s: s.__setitem__("decoder_start", 1)),
    "op-field-unknown": _json_meta("ops", lambda ops: ops[0].__setitem__("alpha", 8)),
    "op-kind-unknown": _json_meta("ops", lambda ops: ops[0].__setitem__("op", "loha")),
    "op-role-unknown": _json_meta("ops", lambda ops: ops[0].__setitem__("role", "attn_x")),
    "op-rank-wrong": _json_meta("ops", lambda ops: ops[0].__setitem__("rank", 5)),
    "op-layer-too-deep": _json_meta("ops", lambda ops: ops[-1].__setitem__("layer", 7)),
    "tensor-wrong-shape": _tensor(
        "layers.0.attn_q.lora_A", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)
    ),
    "tensor-nan": _poison(float("nan")),
    "tensor-inf": _poison(float("inf")),
    "tensor-integer": _tensor("layers.0.attn_q.lora_B", lambda t: t.to(torch.int32)),
    "tensor-missing": lambda tensors, metadata: tensors.pop("layers.1.mlp_down.lora_B"),
    "key-unknown": lambda tensors, metadata: tensors.__setitem__("layers.0.attn_q.extra", torch.zeros(2)),
    "key-unused": lambda tensors, metadata: tensors.__setitem__("layers.0.attn_q.op1.lora_A", torch.zeros(2)),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_air_is_refused(case, valid_air, tmp_path):
    base, air = valid_air
    bad = _rewrite(air, tmp_path / "bad.air.safetensors", BROKEN[case])
    for command in (["compile", bad, "--base", base, "--target", "merged"], ["convert", bad, "--to", "peft",
                    "--base", base]):  # fmt: skip
        out = tmp_path / f"out-{command[0]}"
        result = runner.invoke(app, [*map(str, command), "-o", str(out)])
        assert "; " in assert_refused(result, out, bad)  # names the file, says what to do


def test_garbage_and_unconvertible_air_are_refused(valid_air, tmp_path):
    air = valid_air[1]
    garbage = tmp_path / "garbage.air.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out = tmp_path / "out"
    assert_refused(runner.invoke(app, ["convert", str(garbage), "--to", "air", "-o", str(out)]), out, garbage)
    # AIR -> PEFT needs the base that gives the module names.
    line = assert_refused(runner.invoke(app, ["convert", str(air), "--to", "peft", "-o", str(out)]), out, air)
    assert "--base" in line
    # The output of a convert never overwrites its input, and an existing output needs --force.
    assert_refused(runner.invoke(app, ["convert", str(air), "--to", "air", "-o", str(air)]), air / "x", air)
    copy = tmp_path / "copy.air.safetensors"
    cli("convert", air, "--to", "air", "-o", copy)
    refused = runner.invoke(app, ["convert", str(air), "--to", "air", "-o", str(copy)])
    assert refused.exit_code == 2 and "--force" in refused.stderr
    cli("convert", air, "--to", "air", "-o", copy, "--force")


def test_dora_beside_plain_lora_cannot_be_one_peft_adapter(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(
        "llama", base, tmp_path / "adapter", use_dora=True, target_modules=["q_proj", "v_proj"]
    )
    air = convert_adapter(adapter, "air", tmp_path / "dora.air.safetensors", base=base).out

    def drop_magnitude(tensors, metadata):
        ops = json.loads(metadata["ops"])
        first = ops[0]
        tensors.pop(first["tensors"].pop("magnitude"))
        first.pop("per_column")
        first["op"] = "lora"
        metadata["ops"] = json.dumps(ops)

    mixed = _rewrite(air, tmp_path / "mixed.air.safetensors", drop_magnitude)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(mixed), "--to", "peft", "--base", str(base), "-o", str(out)])
    assert result.exit_code == 2 and "DoRA on some modules" in result.stderr
    assert not out.exists()
    compile_adapter(mixed, base, "merged", tmp_path / "merged")  # the IR itself is fine
