"""project: deltas carried to other dimensions are exact on function-preserving wider and re-parameterised
bases, equal to the input on the adapter's own base, lossy with their error reported elsewhere, and
refused with one clear line where they cannot be carried.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from builders import FP32_TOLERANCE, model_logits, sample_inputs
from growth import grow_wider
from pass_builders import air_of, compiled_logits, gap_to_peft, pass_records
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix.cli import app
from adaptrix.frontends.air.adapter import read_air
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import LowRank, Replace
from adaptrix.passes.project import ProjectOptions, project

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
WIDER = dict(hidden=48, intermediate=96, heads=6, kv_heads=3)  # head_dim 8 and GQA groups of 2 kept
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def case(bases, peft_adapters, tmp_path_factory):
    """The tiny llama source, a wider grown copy, and AIR files of two adapters made on the source."""
    root = tmp_path_factory.mktemp("project")
    source = bases("llama")
    wider = grow_wider(source, root / "wider", **WIDER)
    tokens = [*LINEAR, "embed_tokens", "lm_head"]
    adapters = {"linear": peft_adapters("llama", target_modules=LINEAR),
                "tokens": peft_adapters("llama", seed=4, target_modules=tokens)}  # fmt: skip
    airs = {name: air_of(adapter, root / f"{name}.air.safetensors") for name, adapter in adapters.items()}
    return source, wider, adapters, airs


def carried_gap(case, tmp_path, adapter: str, spec: str, base: Path | None = None) -> tuple[float, dict]:
    """max |logits of the compiled base - PEFT's on the source|, and the pass's report."""
    source, wider, adapters, airs = case
    out = tmp_path / "out"
    got = compiled_logits(airs[adapter], base or wider, out, [spec])
    [record] = pass_records(out)
    return gap_to_peft(got, source, adapters[adapter]), record["report"]


def test_grow_wider_preserves_the_function(case):
    source, wider, _, _ = case
    config = tf.AutoConfig.from_pretrained(wider)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (48, 96, 6)
    inputs = sample_inputs("llama")
    assert (model_logits("llama", wider, inputs) - model_logits("llama", source, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["truncate", "svd", "svd-source"])
def test_projection_onto_a_grown_base_is_exact(case, tmp_path, method):
    source = case[0]
    spec = f"project:method=svd,source={source}" if method == "svd-source" else f"project:method={method}"
    gap, report = carried_gap(case, tmp_path, "tokens", spec)
    assert gap <= FP32_TOLERANCE
    assert report["max_relative_error"] < 1e-6 and report["max_round_trip_error"] < 1e-6
    by_site = {entry["site"]: entry for entry in report["sites"] if entry["op"] == "LowRank"}
    assert by_site["layer 0 attn_k"]["shape_before"] == [16, 32]
    assert by_site["layer 0 attn_k"]["shape_after"] == [24, 48]
    assert by_site["layer 1 mlp_down"]["shape_after"] == [48, 96] and by_site["embed"]["rank_after"] == 4
    assert report["target"]["hidden_size"] == 48 and report["target"]["num_layers"] == 2
    if method == "truncate":  # zero-padding keeps every delta's norm
        assert report["norm_ratio_range"] == pytest.approx([1.0, 1.0], abs=1e-9)


def test_projection_through_the_cli(case, tmp_path):
    source, wider, adapters, airs = case
    out = tmp_path / "out"
    spec = f"project:method=svd,source={source}"
    result = runner.invoke(app, ["compile", str(airs["linear"]), "--base", str(wider), "--target", "merged",
                                 "-o", str(out), "--pass", spec])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = model_logits("llama", out, sample_inputs("llama"))
    assert gap_to_peft(got, source, adapters["linear"]) <= FP32_TOLERANCE


@torch.no_grad()
def reparameterise(source: Path, out: Path, seed: int = 3) -> Path:
    """The same function in other coordinates: gains folded, residual rotated, heads and neurons permuted."""
    model = tf.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config, state = model.config, dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim, group = hidden // heads, heads // kv_heads
    rotation = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator))[0]
    kv_order = torch.randperm(kv_heads, generator=generator)
    q_order = torch.cat([kv * group + torch.randperm(group, generator=generator) for kv in kv_order.tolist()])

    def rows(order: torch.Tensor) -> torch.Tensor:
        return (order[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

    def fold(key: str, gain: str) -> None:  # the reader absorbs its norm's gain and the rotation
        state[key] = state[key] * state[gain][None, :] @ rotation.T

    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fold(f"{p}{name}.weight", f"{p}input_layernorm.weight")
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            fold(f"{p}{name}.weight", f"{p}post_attention_layernorm.weight")
        state[f"{p}input_layernorm.weight"] = state[f"{p}post_attention_layernorm.weight"] = torch.ones(
            hidden
        )
        state[f"{p}self_attn.q_proj.weight"] = state[f"{p}self_attn.q_proj.weight"][rows(q_order)]
        state[f"{p}self_attn.o_proj.weight"] = (
            rotation @ state[f"{p}self_attn.o_proj.weight"][:, rows(q_order)]
        )
        for name in ("k_proj", "v_proj"):
            state[f"{p}self_attn.{name}.weight"] = state[f"{p}self_attn.{name}.weight"][rows(kv_order)]
        neurons = torch.randperm(config.intermediate_size, generator=generator)
        for name in ("gate_proj", "up_proj"):
            state[f"{p}mlp.{name}.weight"] = state[f"{p}mlp.{name}.weight"][neurons]
        state[f"{p}mlp.down_proj.weight"] = rotation @ state[f"{p}mlp.down_proj.weight"][:, neurons]
    fold("lm_head.weight", "model.norm.weight")
    state["model.norm.weight"] = torch.ones(hidden)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] @ rotation.T
    model.load_state_dict(state)
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_aligned_svd_is_exact_on_a_reparameterised_base_where_truncate_is_not(case, tmp_path):
    source = case[0]
    other = reparameterise(source, tmp_path / "other")
    inputs = sample_inputs("llama")
    assert (model_logits("llama", other, inputs) - model_logits("llama", source, inputs)).abs().max() <= 1e-5
    aligned, report = carried_gap(
        case, tmp_path / "aligned", "linear", f"project:method=svd,source={source}", other
    )
    naive, _ = carried_gap(case, tmp_path / "naive", "linear", "project:method=svd", other)
    assert aligned <= FP32_TOLERANCE < 0.1 < naive
    low, high = report["norm_ratio_range"]  # rotations and permutations keep the deltas' norms
    assert 0.999 < low <= high < 1.001


def test_svd_onto_the_adapters_own_base_gives_back_its_deltas(case):
    source, _, _, airs = case
    ir = read_air(airs["linear"]).ir()
    result = project(ir, ProjectOptions(method="svd", source=str(source)), Checkpoint(source))
    assert result.ir.source == ir.source and len(result.ir.ops) == len(ir.ops)
    for (site, before), (after_site, after) in zip(ir, result.ir, strict=True):
        assert site == after_site and isinstance(after, LowRank)
        assert (after.delta() - before.delta()).abs().max() <= 1e-5
    json.dumps(result.report)


def test_interpolate_runs_and_reports_its_error(case, tmp_path):
    gap, report = carried_gap(case, tmp_path, "linear", "project:method=interpolate")
    assert gap > FP32_TOLERANCE  # a naive map: it moves the deltas
    entry = next(e for e in report["sites"] if e["site"] == "layer 0 mlp_up")
    assert entry["method"] == "interpolate" and entry["shape_after"] == [96, 48]
    assert 0 < entry["relative_error"] < 1 and 0 < entry["energy_kept"] < 1
    assert report["max_relative_error"] >= entry["relative_error"]


@pytest.mark.parametrize("method", ["truncate", "interpolate", "svd"])
def test_other_head_layouts_fit_the_base(case, bases, tmp_path, method):
    """Fewer kv heads (GQA groups of 4), a smaller head_dim and hidden: the result fits the base."""
    base = bases("llama", "heads-8-kv-2", hidden_size=24, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=4, intermediate_size=40)  # fmt: skip
    _, report = carried_gap(case, tmp_path, "linear", f"project:method={method}", base)
    entry = next(e for e in report["sites"] if e["site"] == "layer 1 attn_q")
    assert entry["shape_after"] == [32, 24] and report["max_round_trip_error"] > 0
    json.dumps(report)


def test_replace_ops_carry_only_with_what_they_need(case, tmp_path):
    _, wider, _, airs = case
    ir = read_air(airs["tokens"]).ir()
    assert any(isinstance(op, Replace) for _, op in ir)  # PEFT saved the embedding and head beside LoRA
    with pytest.raises(UnsupportedError, match=r"embed: new weight values .* by interpolation"):
        project(ir, ProjectOptions(method="interpolate"), Checkpoint(wider))


def _refused(case, tmp_path, spec: str, adapter: Path | None = None, base: Path | None = None) -> str:
    _, wider, _, airs = case
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(adapter or airs["linear"]), "--base", str(base or wider),
                                 "-o", str(out), "--pass", spec])  # fmt: skip
    return assert_refused(result, out, "pass project")


def test_bad_options_and_sources_are_refused(case, bases, tmp_path):
    source, wider = case[0], case[1]
    assert "option method='pca' is not one of svd, truncate, interpolate" in _refused(
        case, tmp_path, "project:method=pca"
    )
    assert "option source goes with method=svd" in _refused(
        case, tmp_path, f"project:method=truncate,source={source}"
    )
    line = _refused(case, tmp_path, f"project:source={tmp_path / 'nowhere'}")
    assert "is not a base model directory" in line and "; give the directory of the base" in line
    assert "has hidden_size=48, but the adapter was made for hidden_size=32" in _refused(
        case, tmp_path, f"project:source={wider}"
    )


def test_dora_and_other_vocabularies_are_refused_naming_the_site(case, bases, peft_adapters, tmp_path):
    _, _, _, airs = case
    dora = peft_adapters("llama", use_dora=True, target_modules=["q_proj"])
    air = air_of(dora, tmp_path / "dora.air.safetensors")
    line = _refused(case, tmp_path, "project:method=truncate", adapter=air)
    assert "layer 0 attn_q: a DoRA op" in line
    other_vocab = bases("llama", "vocab-96", vocab_size=96)
    line = _refused(case, tmp_path, "project:method=truncate", adapter=airs["tokens"], base=other_vocab)
    assert "embed: the adapter's vocabulary has 128 tokens, the base's 96" in line
