"""AdapterHub adapters Adaptrix cannot compile exactly: one line naming what, exit 2, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hub_builders import DoubleSeqBnConfig, LoRAConfig, PrefixTuningConfig, SeqBnConfig, hub_model, save_hub
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix.cli import app


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _compile(adapter: Path, base: Path, out: Path, target: str = "hooks", *extra: str):
    return _cli("compile", adapter, "--base", base, "--target", target, "-o", out, *extra)


def _edited(adapter: Path, **changes) -> Path:
    """The saved adapter with options of its adapter_config.json changed."""
    file = adapter / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw["config"].update(changes)
    file.write_text(json.dumps(raw))
    return adapter


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"phm_layer": True}, "phm_layer (Compacter"),
        ({"use_gating": True}, "use_gating"),
        ({"inv_adapter": "nice"}, "inv_adapter (invertible adapters)"),
        ({"residual_before_ln": "post_add"}, "residual_before_ln='post_add'"),
        ({"non_linearity": "prelu"}, "activation 'prelu' is not supported"),
    ],
)
def test_unsupported_bottleneck_option_is_refused(changes, named, bases, tmp_path):
    base = bases("llama")
    adapter, _ = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp_path / "adapter")
    out = tmp_path / "out"
    assert_refused(_compile(_edited(adapter, **changes), base, out), out, named)


def test_adapterhub_lora_options_refused(bases, tmp_path):
    base = bases("bert")
    adapter, _ = save_hub("bert", base, LoRAConfig(r=4), tmp_path / "adapter")
    out = tmp_path / "out"
    assert_refused(_compile(_edited(adapter, use_dora=True), base, out), out, "use_dora")


def test_prefix_tuning_and_fusion_refused(bases, tmp_path):
    base = bases("llama")
    adapter, _ = save_hub("llama", base, PrefixTuningConfig(prefix_length=4), tmp_path / "prefix")
    assert_refused(_compile(adapter, base, tmp_path / "out"), tmp_path / "out", "prefix tuning")
    model = hub_model("llama", base, SeqBnConfig(reduction_factor=4))
    model.add_adapter("other", config=SeqBnConfig(reduction_factor=4))
    model.add_adapter_fusion(["hub", "other"])
    model.save_adapter_fusion(str(tmp_path / "fusion"), ["hub", "other"])
    assert_refused(_compile(tmp_path / "fusion", base, tmp_path / "out"), tmp_path / "out", "AdapterFusion")


def test_other_architecture_refused(bases, tmp_path):
    adapter, _ = save_hub("llama", bases("llama"), SeqBnConfig(reduction_factor=4), tmp_path / "adapter")
    out = tmp_path / "out"
    assert_refused(_compile(adapter, bases("bert"), out), out, "was saved from a llama model")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merged_refuses_nonlinear_bottleneck(family, bases, tmp_path):
    base = bases(family)
    adapter, _ = save_hub(family, base, DoubleSeqBnConfig(reduction_factor=4), tmp_path / "adapter")
    out = tmp_path / "out"
    line = assert_refused(_compile(adapter, base, out, "merged"), out, "layer 0 attn_o, layer 0 mlp_down")
    assert "swish is nonlinear" in line and "--target hooks" in line


def test_parallel_identity_bottleneck_refused_by_merged(bases, tmp_path):
    base = bases("bert")
    config = SeqBnConfig(reduction_factor=4, non_linearity="linear", is_parallel=True)
    adapter, _ = save_hub("bert", base, config, tmp_path / "adapter")
    out = tmp_path / "out"
    line = assert_refused(_compile(adapter, base, out, "merged"), out, "layer 0 mlp_down")
    assert "parallel" in line


def test_unmerged_onnx_air_and_passes_refuse_bottlenecks(bases, tmp_path):
    """Merged ONNX puts bottlenecks into the graph (tests/test_onnx_bottleneck.py); these cannot."""
    base = bases("llama")
    adapter, _ = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp_path / "adapter")
    out = tmp_path / "out"
    line = assert_refused(_compile(adapter, base, out, "onnx-cpu", "--unmerged"), out, "layer 0 mlp_down")
    assert "--unmerged ONNX swaps LoRA inputs only" in line and "compile without --unmerged" in line
    result = _cli("convert", adapter, "--to", "air", "-o", tmp_path / "a.air", "--base", base)
    assert_refused(result, tmp_path / "a.air", "AIR cannot hold bottleneck adapters yet")
    result = _compile(adapter, base, out, "hooks", "--pass", "reduce-rank:rank=2")
    assert "pass reduce-rank" in assert_refused(result, out, "layer 1 mlp_down")


def test_hub_adapters_compile_without_the_library_and_parity_names_the_extra(bases, tmp_path, monkeypatch):
    base = bases("llama")
    adapter, _ = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "adapters", None)  # as in the transformers 5 job: not installed
    assert _compile(adapter, base, tmp_path / "hooks").exit_code == 0  # reading needs no `adapters`
    result = _cli("parity", adapter, "--base", base, "--targets", "merged")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "needs the `adapters` library" in result.stderr
    assert 'pip install "adaptrix[adapterhub]"' in result.stderr
