"""`adaptrix parity`: every backend against PEFT's forward; a planted fault is caught and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import make_adapter
from safetensors.torch import load_file, save_file
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app
from adaptrix.io.checkpoint import Checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def case(bases, tmp_path_factory):
    """A llama base, a LoRA adapter on it, and its merged and hooks artifacts."""
    root = tmp_path_factory.mktemp("parity")
    base = bases("llama")
    adapter = make_adapter("llama", base, root / "adapter", seed=3)
    for target in ("merged", "hooks"):
        compile_adapter(adapter, base, target, root / target)
    return base, adapter, root


def parity(*args: str):
    return runner.invoke(app, ["parity", *map(str, args)])


@pytest.mark.onnx_export
def test_every_backend_matches_peft(case, tmp_path):
    base, adapter, _ = case
    result = parity(adapter, "--base", base, "--targets", "merged,hooks,onnx-cpu", "--json",
                    "--work-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["schema"] == 1 and report["reference"] == "peft" and report["ok"] is True
    assert report["output"] == "logits" and report["inputs"] == {"shape": [2, 16], "file": None}
    assert [entry["target"] for entry in report["backends"]] == ["merged", "hooks", "onnx-cpu"]
    for entry in report["backends"]:
        assert set(entry) == {"target", "artifact", "dtype", "max_abs", "max_rel", "top1_agreement", "kl",
                              "tolerance", "ok", "note"}  # fmt: skip
        assert entry["ok"] and entry["max_abs"] <= entry["tolerance"] and entry["top1_agreement"] == 1.0
        assert 0 <= entry["kl"] < 1e-6
    assert list(tmp_path.iterdir()) == []  # the compiled artifacts were temporary


def test_a_flipped_lora_delta_in_a_bundle_is_caught(case, tmp_path):
    base, adapter, root = case
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text((root / "hooks" / "manifest.json").read_text())
    tensors = load_file(root / "hooks" / "bundle.safetensors")
    key = next(name for name in sorted(tensors) if name.endswith("v_proj.lora_up"))
    tensors[key] = -tensors[key]
    save_file(tensors, bundle / "bundle.safetensors")
    result = parity(adapter, "--base", base, "--artifact", f"hooks={bundle}", "--artifact",
                    f"merged={root / 'merged'}")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "MISMATCH in hooks" in result.output and "merged" not in result.output.split("MISMATCH in")[1]


def test_a_flipped_delta_in_a_merged_model_is_caught(case, tmp_path):
    base, adapter, root = case
    merged = tmp_path / "merged"
    merged.mkdir()
    for item in (root / "merged").iterdir():
        (merged / item.name).write_bytes(item.read_bytes())
    shard = next(merged.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight"
    original = Checkpoint(base).read(name)
    tensors[name] = 2 * original - tensors[name]  # the same delta, the other sign
    save_file(tensors, shard, metadata={"format": "pt"})
    result = parity(adapter, "--base", base, "--artifact", f"merged={merged}", "--json")
    assert result.exit_code == 1
    [entry] = json.loads(result.output)["backends"]
    assert entry["target"] == "merged" and not entry["ok"] and entry["max_abs"] > 100 * entry["tolerance"]


def test_the_tolerance_option_is_applied(case):
    base, adapter, root = case
    strict = parity(
        adapter, "--base", base, "--artifact", f"merged={root / 'merged'}", "--tolerance", "1e-12"
    )
    assert strict.exit_code == 1 and "MISMATCH in merged" in strict.output
    loose = parity(adapter, "--base", base, "--artifact", f"merged={root / 'merged'}", "--tolerance",
                   "merged=1e-3", "--json")  # fmt: skip
    assert loose.exit_code == 0 and json.loads(loose.output)["backends"][0]["tolerance"] == 1e-3


def test_inputs_from_a_file(case, tmp_path):
    base, adapter, root = case
    ids = tmp_path / "ids.json"
    ids.write_text(
        json.dumps(
            {"input_ids": [[5, 6, 7, 8], [9, 10, 11, 12]], "attention_mask": [[0, 1, 1, 1], [1, 1, 1, 1]]}
        )
    )
    result = parity(
        adapter, "--base", base, "--artifact", f"hooks={root / 'hooks'}", "--inputs", ids, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["inputs"] == {"shape": [2, 4], "file": str(ids)}


@pytest.mark.parametrize(
    ("case_id", "args", "words"),
    [
        ("unknown-target", ["--targets", "merged,tflite"], "unknown parity target 'tflite'"),
        (
            "artifact-of-another-target",
            ["--artifact", "merged={hooks}"],
            "was compiled for 'hooks', not merged",
        ),
        ("artifact-without-manifest", ["--artifact", "merged={tmp}"], "has no manifest.json"),
        ("bad-tolerance", ["--tolerance", "merged=tight"], "is not a valid value"),
        ("ids-outside-vocab", ["--inputs", "{ids}"], "outside the base's vocabulary"),
    ],
)
def test_bad_input_is_one_line_exit_2(case, tmp_path, case_id, args, words):
    base, adapter, root = case
    (tmp_path / "ids.json").write_text("[[1, 2, 100000]]")
    values = {"hooks": root / "hooks", "tmp": tmp_path, "ids": tmp_path / "ids.json"}
    args = [arg.format(**values) for arg in args]
    nothing = tmp_path / "nothing-written-here"
    line = assert_refused(parity(adapter, "--base", base, *args, "--work-dir", tmp_path), nothing, words)
    assert len(line) < 300 and sorted(p.name for p in tmp_path.iterdir()) == ["ids.json"]


def test_merged_of_an_encoder_classifier(bases, tmp_path):
    base = bases("bert")
    adapter = make_adapter("bert", base, tmp_path / "adapter", seed=2)
    result = parity(adapter, "--base", base, "--targets", "merged,hooks", "--json", "--work-dir", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["output"] == "outputs" and all(e["ok"] and e["kl"] is None for e in report["backends"])


def test_parity_api_is_the_command(case):
    from adaptrix.api.parity import parity as run_parity

    base, adapter, root = case
    report = run_parity(adapter, base, [], artifacts={"hooks": root / "hooks"})
    assert (
        report.ok
        and report.backends[0].max_abs < 1e-4
        and torch.isfinite(torch.tensor(report.backends[0].kl))
    )
    assert isinstance(report.as_json()["backends"][0]["max_rel"], float) and Path(report.adapter) == adapter


@pytest.mark.onnx_export
def test_every_target_is_reported_when_one_cannot_run(case, tmp_path):
    base, adapter, root = case
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text((root / "hooks" / "manifest.json").read_text())
    (bundle / "bundle.safetensors").write_bytes(b"not a safetensors file")
    result = parity(adapter, "--base", base, "--artifact", f"hooks={bundle}", "--artifact",
                    f"merged={root / 'merged'}", "--json")  # fmt: skip
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    rows = {entry["target"]: entry for entry in report["backends"]}
    assert report["ok"] is False and sorted(rows) == ["hooks", "merged"]
    assert rows["merged"]["ok"] is True
    failed = rows["hooks"]
    assert (
        failed["ok"] is False and failed["max_abs"] is None and failed["note"].startswith("could not run: ")
    )
    assert "bundle.safetensors" in failed["note"]
    text = parity(adapter, "--base", base, "--artifact", f"hooks={bundle}", "--artifact",
                  f"merged={root / 'merged'}")  # fmt: skip
    assert text.exit_code == 1 and "FAILED" in text.output and "could not run" in text.output


def test_every_target_is_reported_when_one_cannot_compile(case, tmp_path):
    from adaptrix.api.parity import parity as run_parity
    from adaptrix.ir.errors import UnsupportedError

    def compile_fn(adapter, base, target, out):
        if target == "merged":
            raise UnsupportedError("a planted refusal", fix="none")
        return compile_adapter(adapter, base, target, out)

    base, adapter, _ = case
    report = run_parity(adapter, base, ["merged", "hooks"], work_dir=tmp_path, compile_fn=compile_fn)
    rows = {row.target: row for row in report.backends}
    assert not report.ok and sorted(rows) == ["hooks", "merged"] and rows["hooks"].ok is True
    assert rows["merged"].ok is False and rows["merged"].note == "could not compile: a planted refusal; none"
    assert json.loads(json.dumps(report.as_json(), allow_nan=False))["ok"] is False  # strict JSON


@pytest.mark.onnx_export
def test_a_row_it_does_not_judge_is_not_ok_true(case, tmp_path):
    base, adapter, _ = case
    quantized = tmp_path / "int8"
    compile_adapter(adapter, base, "onnx-cpu", quantized, quantize="int8")
    result = parity(adapter, "--base", base, "--artifact", f"onnx-cpu={quantized}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    [row] = report["backends"]
    assert row["tolerance"] is None and row["ok"] is None and report["ok"] is True
    text = parity(adapter, "--base", base, "--artifact", f"onnx-cpu={quantized}")
    assert text.exit_code == 0 and "not judged" in text.output
    judged = parity(adapter, "--base", base, "--artifact", f"onnx-cpu={quantized}", "--tolerance", "0.5",
                    "--json")  # fmt: skip
    assert json.loads(judged.output)["backends"][0]["ok"] is True


def test_the_json_is_strict_whatever_the_numbers():
    from adaptrix.api.parity import BackendResult, ParityReport

    nan, inf = float("nan"), float("inf")
    row = BackendResult("merged", "out", "float32", nan, inf, 0.5, nan, 1e-4, False)
    report = ParityReport("a", "b", "logits", {"shape": [2, 16], "file": None}, (row,))
    [entry] = json.loads(json.dumps(report.as_json(), allow_nan=False))["backends"]
    assert entry["max_abs"] is None and entry["max_rel"] is None and entry["kl"] is None
    assert entry["top1_agreement"] == 0.5 and entry["ok"] is False
