"""`adaptrix verify`: an artifact checked against its manifest; every kind of damage is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import exports_onnx, make_adapter, needs_onnx_export
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def built(bases, tmp_path_factory):
    """Compiled merged, hooks and onnx-cpu artifacts of one llama adapter (copied by each test)."""
    root = tmp_path_factory.mktemp("verify")
    base = bases("llama")
    adapter = make_adapter("llama", base, root / "adapter", seed=8)
    for target in ("merged", "hooks", "onnx-cpu")[: None if exports_onnx() else 2]:
        compile_adapter(adapter, base, target, root / target)
    return root, base, adapter


def verify(path: Path, *extra: str):
    return runner.invoke(app, ["verify", str(path), *extra])


def fresh(built, target: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0] / target, tmp_path / target))


ONNX_CPU = pytest.param("onnx-cpu", marks=pytest.mark.onnx_export)


@pytest.mark.parametrize("target", ["merged", "hooks", ONNX_CPU])
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


@pytest.mark.onnx_export
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


# Every artifact kind a compile writes, as (target, adapters, options): each must verify as written.
KINDS = {
    "merged": ("merged", ["lora"], {}),
    "hooks": ("hooks", ["lora"], {}),
    "onnx-cpu": ("onnx-cpu", ["lora"], {}),
    "onnx-cpu-unmerged-lora": ("onnx-cpu", ["lora"], {"unmerged": True}),
    "onnx-cpu-unmerged-ia3": ("onnx-cpu", ["ia3"], {"unmerged": True}),
    "onnx-cpu-int8": ("onnx-cpu", ["lora"], {"quantize": "int8"}),
    "onnx-cpu-int4": ("onnx-cpu", ["lora"], {"quantize": "int4"}),
    "onnx-cpu-int8-unmerged": ("onnx-cpu", ["lora", "ia3"], {"unmerged": True, "quantize": "int8"}),
    "onnx-cpu-int4-unmerged": ("onnx-cpu", ["ia3"], {"unmerged": True, "quantize": "int4"}),
}


@pytest.fixture(scope="module")
def kinds(bases, tmp_path_factory):
    """Compiled artifacts by kind, each made on first use from one llama base, a LoRA and an IA3 adapter."""
    from builders import load_model
    from peft import IA3Config
    from test_peft_kinds import perturbed

    root = tmp_path_factory.mktemp("kinds")
    base = bases("llama")
    ia3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapters = {
        "lora": make_adapter("llama", base, root / "lora", seed=5),
        "ia3": perturbed(load_model("llama", base), ia3, root / "ia3"),
    }
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            target, names, options = KINDS[kind]
            if target.startswith("onnx"):
                needs_onnx_export()
            compile_adapter([adapters[n] for n in names], base, target, root / kind, **options)
            made[kind] = root / kind
        return made[kind]

    return get


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_artifact_kind_verifies_as_compiled(kinds, kind):
    result = verify(kinds(kind), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["problems"] == [] and report["checked_inputs"] >= 2


def _rewrite(artifact: Path, change) -> None:
    """Apply `change` to the parsed manifest.json and write it back."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    change(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _name_output(manifest: dict, name: str, source: Path) -> None:
    """List `name` as an output with the size and sha256 of `source` (what an oracle would probe)."""
    import hashlib

    data = source.read_bytes()
    manifest["outputs"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"].append(name)


@pytest.mark.parametrize("spelling", ["../secret.txt", "sub/../../secret.txt", "{abs}", "./config.json"])
def test_a_manifest_naming_a_path_outside_is_refused(built, tmp_path, spelling):
    artifact = fresh(built, "merged", tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the artifact's")
    name = spelling.format(abs=secret)
    _rewrite(artifact, lambda m: _name_output(m, name, secret if "secret" in name else artifact / name))
    assert_refused(verify(artifact), tmp_path / "nothing", name)


def test_a_link_out_of_the_artifact_is_not_followed(built, tmp_path):
    artifact = fresh(built, "merged", tmp_path)
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((artifact / "config.json").read_bytes())  # the very bytes: only the link differs
    (artifact / "config.json").unlink()
    (artifact / "config.json").symlink_to(outside)
    result = verify(artifact, "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.output)["problems"] == ["config.json: a link that leads out of the artifact"]


def test_a_manifest_linked_from_outside_is_refused(built, tmp_path):
    artifact = fresh(built, "hooks", tmp_path)
    outside = tmp_path / "manifest-elsewhere.json"
    (artifact / "manifest.json").rename(outside)
    (artifact / "manifest.json").symlink_to(outside)
    assert_refused(verify(artifact), tmp_path / "nothing", "leads out of the artifact")


INCOMPLETE = {
    "null-outputs": (lambda m: m.update(outputs=None), "outputs"),
    "no-outputs": (lambda m: m.pop("outputs"), "outputs"),
    "no-files": (lambda m: m.pop("files"), "files"),
    "files-not-a-list": (lambda m: m.update(files="model.safetensors"), "files"),
    "outputs-not-files": (lambda m: m["files"].pop(), "files"),
    "bytes-as-text": (lambda m: next(iter(m["outputs"].values())).update(bytes="12"), "bytes"),
    "no-sha256": (lambda m: next(iter(m["outputs"].values())).pop("sha256"), "sha256"),
    "no-inputs": (lambda m: m.pop("inputs"), "inputs"),
    "input-name-a-path": (lambda m: m["inputs"]["base"]["files"].update({"../x": "0" * 64}), "../x"),
    "target-not-text": (lambda m: m.update(target=7), "target"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INCOMPLETE))
def test_an_incomplete_manifest_is_refused(built, tmp_path, case):
    artifact = fresh(built, "merged", tmp_path)
    change, words = INCOMPLETE[case]
    _rewrite(artifact, change)
    line = assert_refused(verify(artifact), tmp_path / "nothing", words)
    assert "manifest.json" in line


def test_a_rewritten_manifest_is_caught_only_by_its_pinned_sha256(built, tmp_path):
    import hashlib

    artifact = fresh(built, "merged", tmp_path)
    report = json.loads(verify(artifact, "--json").output)
    pinned = report["manifest_sha256"]
    assert pinned == hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    assert pinned in verify(artifact).output  # the text output shows it too, for CI to record
    assert verify(artifact, "--expect", pinned.upper()).exit_code == 0
    # An attacker changes a weight and writes its new hash into the manifest: the files match again.
    _flip_last_byte(next(artifact.glob("*.safetensors")))
    shard = next(artifact.glob("*.safetensors"))
    _rewrite(artifact, lambda m: _name_output(m, shard.name, shard))
    _rewrite(artifact, lambda m: m.update(files=sorted(set(m["files"]))))
    assert verify(artifact).exit_code == 0  # what verify cannot see without a pin
    pinned_run = verify(artifact, "--expect", pinned, "--json")
    assert pinned_run.exit_code == 1
    [problem] = json.loads(pinned_run.output)["problems"]
    assert problem.startswith("manifest.json: sha256 ") and pinned in problem
    from adaptrix.api.verify import verify_artifact

    assert not verify_artifact(artifact, expect=pinned).ok
    assert verify_artifact(
        artifact, expect=hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    ).ok


def test_a_malformed_expect_is_refused(built, tmp_path):
    artifact = fresh(built, "hooks", tmp_path)
    assert_refused(verify(artifact, "--expect", "abc123"), tmp_path / "nothing", "--expect")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_artifact_does_not_depend_on_how_paths_are_spelled(bases, tmp_path, monkeypatch):
    from adaptrix.api.convert import convert_adapter

    root = tmp_path / "work"
    shutil.copytree(bases("llama"), root / "base")
    make_adapter("llama", root / "base", root / "adapter", seed=6)
    (root / "x").mkdir()
    spelled = {"relative": (Path("adapter"), Path("base")),
               "absolute": (root / "x" / ".." / "adapter", root / "x" / ".." / "base")}  # fmt: skip
    for how, (adapter, base) in spelled.items():
        monkeypatch.chdir(root if how == "relative" else tmp_path)
        targets = (("merged", {}), ("hooks", {}), ("onnx-cpu", {"unmerged": True}))
        for target, options in targets[: None if exports_onnx() else 2]:
            compile_adapter(adapter, base, target, root / how / target, **options)
        convert_adapter(adapter, "air", root / how / "adapter.air", base=base)
    relative, absolute = _tree(root / "relative"), _tree(root / "absolute")
    assert sorted(relative) == sorted(absolute) and len(relative) > (10 if exports_onnx() else 5)
    assert [name for name in relative if relative[name] != absolute[name]] == []
