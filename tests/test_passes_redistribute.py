"""redistribute: an adapter moved onto a grown deeper base computes what it computed on its source;
depth mode conserves each role's total delta; options that do not fit are refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from builders import FP32_TOLERANCE, make_adapter, model_logits, sample_inputs
from growth import grow_deeper
from pass_builders import air_of, compiled_logits, gap_to_peft, pass_records
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix import compile_adapter
from adaptrix.cli import app
from adaptrix.frontends.air.adapter import read_air
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR, Bias, LazyTensor, LowRank, Replace, Role, Site
from adaptrix.passes.redistribute import RedistributeOptions, redistribute

POSITIONS = (1, 2, 5, 7)  # where the 4-layer source's layers sit in the grown 8-layer base
LAYERS = ",".join(map(str, POSITIONS))
GROWN = 1e-5  # max |diff| of logits, grown base against its source (float32)

runner = CliRunner()


@pytest.fixture(scope="module")
def case(bases, tmp_path_factory):
    """A 4-layer llama, an 8-layer one grown from it, and LoRA / DoRA adapters of the source as AIR."""
    root = tmp_path_factory.mktemp("redistribute")
    source = bases("llama", "four-layers", num_hidden_layers=4)
    deeper = grow_deeper(source, root / "deeper", POSITIONS, depth=8)
    found = {"source": source, "deeper": deeper}
    for name, lora in (("lora", {}), ("dora", dict(use_dora=True, target_modules=["q_proj", "v_proj"]))):
        found[name] = make_adapter("llama", source, root / name, **lora)
        found[f"{name}_air"] = air_of(found[name], root / f"{name}.air.safetensors", base=source)
    return found


def role_totals(ir: AdapterIR) -> dict[Role, torch.Tensor]:
    """Each role's summed dense LoRA delta over all layers (tiny shapes: fine in a test)."""
    totals: dict[Role, torch.Tensor] = {}
    for site, op in ir:
        if site.layer is not None and isinstance(op, LowRank):
            totals[site.role] = totals.get(site.role, 0) + op.delta().double()
    return totals


def assert_conserved(before: AdapterIR, after: AdapterIR) -> None:
    expected, got = role_totals(before), role_totals(after)
    assert set(got) == set(expected)
    for role, total in expected.items():
        assert float((got[role] - total).norm() / total.norm()) < 1e-6, role


def test_grown_base_computes_what_its_source_computes(case):
    inputs = sample_inputs("llama")
    got = model_logits("llama", case["deeper"], inputs)
    assert (got - model_logits("llama", case["source"], inputs)).abs().max() <= GROWN
    assert json.loads((case["deeper"] / "config.json").read_text())["num_hidden_layers"] == 8


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_chosen_layers_carry_the_adapter_exactly_onto_the_grown_base(case, tmp_path, kind):
    out = tmp_path / "out"
    got = compiled_logits(case[f"{kind}_air"], case["deeper"], out, [f"redistribute:layers={LAYERS}"])
    assert gap_to_peft(got, case["source"], case[kind]) <= FP32_TOLERANCE
    [record] = pass_records(out)
    report = record["report"]
    assert record["changed"] and report["matrix"] == torch.eye(4).tolist()
    assert (report["source_depth"], report["target_depth"]) == (4, 8)
    assert report["target_layers"] == list(POSITIONS)
    assert report["total_delta_relative_error"] < 1e-6
    assert {"site": "layer 5 attn_q", "from_layers": [2], "weights": [1.0], "rank": 4} in report["sites"]


def test_cli_compiles_air_from_a_shallower_base(case, tmp_path):
    out = tmp_path / "out"
    args = ["compile", case["lora_air"], "--base", case["deeper"], "--pass", f"redistribute:layers={LAYERS}",
            "--target", "merged", "--dtype", "float32", "-o", out]  # fmt: skip
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (result.output, result.exception)
    got = model_logits("llama", out, sample_inputs("llama"))
    assert gap_to_peft(got, case["source"], case["lora"]) <= FP32_TOLERANCE


def test_depth_mode_linear_conserves_each_roles_total_and_composes(case):
    ir = read_air(case["lora_air"]).ir()
    deeper = redistribute(ir, RedistributeOptions(), Checkpoint(case["deeper"]))
    assert deeper.changed and deeper.ir.source.num_layers == 8
    matrix = torch.tensor(deeper.report["matrix"])
    assert matrix.shape == (8, 4) and torch.allclose(matrix.sum(0), torch.ones(4))
    assert matrix[0, 0] == matrix[1, 0] == 0.5  # source layer i sits between targets 2i and 2i+1
    assert deeper.report["total_delta_relative_error"] < 1e-6
    assert_conserved(ir, deeper.ir)
    shallower = redistribute(deeper.ir, RedistributeOptions(depth=3), Checkpoint(case["deeper"]))
    assert shallower.ir.source.num_layers == 3 and {site.layer for site, _ in shallower.ir} == {0, 1, 2}
    assert torch.allclose(torch.tensor(shallower.report["matrix"]).sum(0), torch.ones(8))
    assert max(entry["rank"] for entry in shallower.report["sites"]) > 4  # mixed sources stack their ranks
    assert_conserved(ir, shallower.ir)


def test_depth_mode_nearest_sends_each_layer_whole_and_compiles(case, tmp_path):
    ir = read_air(case["lora_air"]).ir()
    result = redistribute(ir, RedistributeOptions(depth=8, method="nearest"), Checkpoint(case["deeper"]))
    matrix = torch.tensor(result.report["matrix"])
    assert sorted(matrix.reshape(-1).tolist()).count(1.0) == 4 and torch.equal(matrix.sum(0), torch.ones(4))
    assert {site.layer for site, _ in result.ir if site.layer is not None} == {0, 2, 4, 6}  # ties: shallower
    assert_conserved(ir, result.ir)
    out = tmp_path / "out"
    passes = ["redistribute:depth=8,method=nearest"]
    compile_adapter(case["lora_air"], case["deeper"], "merged", out, dtype="float32", passes=passes)
    assert json.loads((out / "manifest.json").read_text())["source"]["num_layers"] == 8


def test_as_many_targets_as_layers_is_the_identity(case):
    ir = read_air(case["dora_air"]).ir()
    for options in (RedistributeOptions(), RedistributeOptions(layers=(3, 0, 2, 1), depth=4)):
        result = redistribute(ir, options, Checkpoint(case["source"]))
        assert not result.changed and result.ir is ir and result.report["matrix"] == torch.eye(4).tolist()


def tiny_ir(case, ops) -> AdapterIR:
    return AdapterIR(tuple(ops), replace(Checkpoint(case["source"]).source, num_layers=2))


def test_bias_deltas_are_mixed_and_replace_moves_only_whole(case):
    vector = LazyTensor.of(torch.arange(4.0), "bias")
    ops = [(Site(i, Role.ATTN_O), Bias(vector.scaled(i + 1))) for i in range(2)]
    ops.append((Site(None, Role.LM_HEAD), Bias(vector)))
    base = Checkpoint(case["deeper"])
    result = redistribute(tiny_ir(case, ops), RedistributeOptions(depth=1), base)
    [(head, kept), (site, summed)] = list(result.ir)
    assert head.layer is None and kept is ops[2][1]
    assert site == Site(0, Role.ATTN_O) and torch.equal(summed.delta.load(), 3 * torch.arange(4.0))
    assert result.report["total_delta_relative_error"] < 1e-7
    swap = [(Site(i, Role.MLP_NORM), Replace({"weight": vector})) for i in range(2)]
    moved = redistribute(tiny_ir(case, swap), RedistributeOptions(layers=(3, 6)), base)
    assert [site.layer for site, _ in moved.ir] == [3, 6]
    with pytest.raises(UnsupportedError, match=r"^layer 0 mlp_norm: a Replace op is not linear.*get 0.75"):
        redistribute(tiny_ir(case, swap), RedistributeOptions(layers=(3, 4, 5)), base)


def test_an_adapter_without_layer_ops_changes_nothing_but_its_depth(case):
    ops = [(Site(None, Role.LM_HEAD), Bias(LazyTensor.of(torch.ones(4), "bias")))]
    result = redistribute(tiny_ir(case, ops), RedistributeOptions(depth=2), Checkpoint(case["deeper"]))
    assert not result.changed and "no per-layer ops" in result.report["note"]


@pytest.mark.parametrize(
    ("adapter", "spec", "named"),
    [
        ("lora_air", "redistribute:layers=1,8", "pass redistribute: target layer 8 is outside the base"),
        ("lora_air", "redistribute:depth=9", "pass redistribute: target layer 8 is outside the base"),
        ("lora_air", "redistribute:layers=1,2,2,5", "pass redistribute: option layers names layer 2 twice"),
        ("lora_air", "redistribute:layers=1,5,depth=4", "option layers has layer 5, outside depth=4"),
        ("lora_air", "redistribute:depth=0", "option depth=0 must be at least 1"),
        ("lora_air", "redistribute:method=cubic", "pass redistribute: option method='cubic' is not one of"),
        ("dora_air", "redistribute:depth=8", "pass redistribute: layer 0 attn_q: a DoRA op is not linear"),
    ],
)
def test_options_that_do_not_fit_are_refused_in_one_line(case, tmp_path, adapter, spec, named):
    out = tmp_path / "out"
    args = ["compile", case[adapter], "--base", case["deeper"], "--pass", spec, "-o", out]
    assert_refused(runner.invoke(app, [str(arg) for arg in args]), out, named)
