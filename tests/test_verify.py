"""`adaptrix verify`: an artifact checked against its manifest; every kind of damage is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import make_adapter
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix.cli import app
from adaptrix.toolchain.pipeline import compile_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def built(bases, tmp_path_factory):
    """Compiled merged, hooks and onnx-cpu artifacts of one llama adapter (copied by each test)."""
    root = tmp_path_factory.mktemp("verify")
    base = bases("llama")
    adapter = make_adapter("llama", base, root / "adapter", seed=8)
    for target in ("merged", "hooks", "onnx-cpu"):
        compile_adapter(adapter, base, target, root / target)
    return root, base, adapter


def verify(path: Path, *extra: str):
    return runner.invoke(app, ["verify", str(path), *extra])


def fresh(built, target: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0] / target, tmp_path / target))


@pytest.mark.parametrize("target", ["merged", "hooks", "onnx-cpu"])
def test_an_intact_artifact_verifies(built, tmp_path, target):
    artifact = fresh(built, target, tmp_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["outputs"]) == set(manifest["files"]) - {"manifest.json"}
    result = verify(artifact, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["problems"] == [] and report["target"] == target
    assert report["checked_files"] == len(manifest["outputs"]) and report["checked_inputs"] >= 2


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    "changed-weights": (lambda a: _flip_last_byte(next(a.glob("*.safetensors"))), "sha256 differs"),
    "truncated-weights": (lambda a: (f := next(a.glob("*.safetensors"))).write_bytes(f.read_bytes()[:-8]),
                          "bytes, the manifest says"),
    "missing-config": (lambda a: (a / "config.json").unlink(), "config.json: missing"),
    "added-file": (lambda a: (a / "notes.txt").write_text("hi"), "notes.txt: not in the manifest"),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_named_and_exits_1(built, tmp_path, damage):
    artifact = fresh(built, "merged", tmp_path)
    harm, words = DAMAGE[damage]
    harm(artifact)
    result = verify(artifact)
    assert result.exit_code == 1 and words in result.output and "1 difference(s)" in result.output


def test_a_changed_onnx_graph_and_data_are_named(built, tmp_path):
    import onnx

    artifact = fresh(built, "onnx-cpu", tmp_path)
    model = onnx.load(artifact / "model.onnx", load_external_data=False)
    model.graph.input[0].name = "renamed_ids"
    onnx.save(model, artifact / "model.onnx")
    _flip_last_byte(artifact / "model.onnx_data")
    report = json.loads(verify(artifact, "--json").output)
    assert not report["ok"]
    assert any("model.onnx: its inputs ['renamed_ids'" in line for line in report["problems"])
    assert any(line.startswith("model.onnx_data: sha256 differs") for line in report["problems"])


def test_a_changed_input_is_named_and_can_be_skipped(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter", seed=9)
    compile_adapter(adapter, base, "hooks", tmp_path / "bundle")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text() + "\n"
    )
    result = verify(tmp_path / "bundle")
    assert (
        result.exit_code == 1
        and "input adapter" in result.output
        and "changed since the compile" in result.output
    )
    assert verify(tmp_path / "bundle", "--skip-inputs").exit_code == 0
    shutil.rmtree(tmp_path / "adapter")
    gone = verify(tmp_path / "bundle", "--json")
    assert gone.exit_code == 0 and any(
        "not there any more" in note for note in json.loads(gone.output)["notes"]
    )


def test_what_is_not_an_artifact_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    assert_refused(verify(tmp_path / "folder"), tmp_path / "folder" / "nothing", "has no manifest.json")
    (tmp_path / "folder" / "manifest.json").write_text("{not json")
    assert_refused(verify(tmp_path / "folder"), tmp_path / "folder" / "nothing", "is not valid JSON")
