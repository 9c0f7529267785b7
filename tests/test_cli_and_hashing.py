"""The CLI's listing and inspect commands, and the manifest's sha256 cache."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from builders import exports_onnx, make_adapter
from typer.testing import CliRunner

from adaptrix.binders import BINDERS
from adaptrix.cli import app
from adaptrix.io import hashing
from adaptrix.io.hashing import hash_early, hash_files

runner = CliRunner()


def test_archs_all_lists_every_text_family_and_what_it_compiles_to():
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as SEQ2SEQ

    table = runner.invoke(app, ["archs", "--all", "--markdown"])
    assert table.exit_code == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in table.stdout.splitlines()[2:]}
    assert set(SEQ2SEQ) <= set(rows) and set(BINDERS) <= set(rows)
    onnx = "optimum" if exports_onnx() else "genai-builder"
    assert rows["llama"] == f"| llama | llama table | yes | yes | {onnx} | yes |"
    seq2seq = "optimum" if exports_onnx() else "needs optimum-onnx"
    assert rows["t5"] == f"| t5 | module tree | yes | yes | {seq2seq} | no |" or "t5 table" in rows["t5"]
    assert rows["mixtral"].split(" | ")[4] == "torch.onnx"  # optimum has no mixtral config
    assert rows["gpt2"].startswith("| gpt2 | gpt2 table (fused splits) |")


def test_docs_support_holds_the_archs_table():
    pytest.importorskip("optimum.exporters.onnx", reason="the onnx column says what optimum exports")
    table = runner.invoke(app, ["archs", "--markdown"])
    assert table.exit_code == 0
    docs = (Path(__file__).parents[1] / "docs" / "support.md").read_text()
    assert table.stdout in docs, "regenerate docs/support.md's table with `adaptrix archs --markdown`"


def test_archs_and_targets_list_the_registries():
    archs = runner.invoke(app, ["archs"])
    assert archs.exit_code == 0
    assert all(model_type in archs.stdout for model_type in BINDERS)
    targets = runner.invoke(app, ["targets"])
    assert targets.exit_code == 0 and "merged" in targets.stdout


def test_inspect_reports_sites_ranks_scales_and_sizes(bases, tmp_path):
    base = bases("phi3")
    adapter = make_adapter("phi3", base, tmp_path / "adapter", rank_pattern={"o_proj": 2}, use_rslora=True)
    result = runner.invoke(app, ["inspect", str(adapter), "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layers"] == [0, 1]
    # The fused qkv_proj and gate_up_proj are reported per role.
    assert {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"} <= set(report["roles"])
    by_role = {(row["layer"], row["role"]): row for row in report["rows"]}
    assert by_role[(0, "attn_o")]["rank"] == 2 and by_role[(0, "attn_q")]["rank"] == 4
    assert abs(by_role[(0, "attn_o")]["scale"] - 8 / 2**0.5) < 1e-9
    file_params = sum(1 for _ in adapter.glob("adapter_model.safetensors"))
    assert file_params == 1 and report["parameters"] > 0
    assert report["bytes"] == 4 * report["parameters"]  # PEFT saves LoRA weights in float32
    plain = runner.invoke(app, ["inspect", str(adapter), "--json"])  # no base: per PEFT module
    assert plain.exit_code == 0
    modules = {row["module"] for row in json.loads(plain.stdout)["rows"]}
    assert "model.layers.1.self_attn.qkv_proj" in modules
    table = runner.invoke(app, ["inspect", str(adapter)], terminal_width=60)
    assert table.exit_code == 0 and "…" not in table.stdout


def test_hash_cache_reuses_digests_and_sees_every_change(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 1000)
    old = file.stat().st_mtime - 60
    os.utime(file, (old, old))  # settled: old enough to be cached
    first = hash_files([file])[file]
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert (tmp_path / "cache" / "adaptrix" / "sha256.json").is_file()
    # Same size, mtime put back: ctime still changes, so the new content is hashed.
    file.write_bytes(b"b" * 1000)
    os.utime(file, (old, old))
    assert hash_files([file])[file] == hashlib.sha256(b"b" * 1000).hexdigest()


def test_fresh_files_are_not_cached_and_the_cache_can_be_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    file = tmp_path / "fresh.bin"
    file.write_bytes(b"x")
    hash_files([file])
    cache = tmp_path / "cache" / "adaptrix" / "sha256.json"
    assert not cache.exists() or str(file.resolve()) not in json.loads(cache.read_text())
    monkeypatch.setenv("ADAPTRIX_HASH_CACHE", "0")
    old = file.stat().st_mtime - 60
    os.utime(file, (old, old))
    hash_files([file])
    assert not cache.exists() or str(file.resolve()) not in json.loads(cache.read_text())


def test_files_hashed_early_are_picked_up_unless_they_changed_since(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTRIX_HASH_CACHE", "0")
    monkeypatch.setattr(hashing, "_early", {})  # not what earlier, refused compiles of this process started
    kept, changed = tmp_path / "kept.bin", tmp_path / "changed.bin"
    kept.write_bytes(b"k" * 5000)
    changed.write_bytes(b"c" * 5000)
    hash_early([kept, changed])
    for key in list(hashing._early):
        hashing._early[key][1].result()  # the early thread is done
    changed.write_bytes(b"d" * 5001)  # a new size: the identity differs even within one clock tick
    hashed = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    digests = hash_files([kept, changed])
    assert digests[kept] == hashlib.sha256(b"k" * 5000).hexdigest()
    assert digests[changed] == hashlib.sha256(b"d" * 5001).hexdigest()
    assert hashed == ["changed.bin"]  # kept.bin came from the early thread
    assert not hashing._early  # picked up once, then forgotten


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    result = runner.invoke(
        app,
        ["--debug", "compile", str(tmp_path / "nope"), "--base", str(tmp_path), "-o", str(tmp_path / "o")],
    )
    assert result.exit_code == 2
    assert "Traceback" in result.output and "has no config.json" in result.output
    assert not (tmp_path / "o").exists()


def test_library_callers_get_the_compiles_process_settings(bases, tmp_path, monkeypatch):
    """compile_adapter starts hashing the base early, as the CLI does; adaptrix.api sets the wait policy."""
    import adaptrix.api  # noqa: F401
    from adaptrix.api.compile import compile_adapter

    assert os.environ.get("OMP_WAIT_POLICY")
    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    started = []
    real = hashing.hash_early
    monkeypatch.setattr(hashing, "hash_early", lambda files: started.append(list(files)) or real(files))
    compile_adapter(adapter, base, "hooks", tmp_path / "out")
    assert started and {f.name for f in started[0]} >= {"config.json"}


def test_inspect_describes_a_compiled_artifact_from_its_manifest(bases, tmp_path):
    from adaptrix.api.compile import compile_adapter

    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "merged", tmp_path / "merged", passes=["reduce-rank:rank=2"])
    result = runner.invoke(app, ["inspect", str(tmp_path / "merged"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "merged artifact" and summary["arch"] == "llama" and summary["sites"] > 0
    assert summary["passes"] == ["reduce-rank"]
    assert {row["module"] for row in summary["rows"]} >= {"config.json", "model.safetensors"}
    manifest = tmp_path / "merged" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["outputs"]["../../outside"] = "0" * 64  # a tampered manifest names no file outside
    manifest.write_text(json.dumps(data))
    text = runner.invoke(app, ["inspect", str(tmp_path / "merged")])
    assert text.exit_code == 0 and "outside" not in text.stdout and "merged for a llama base" in text.stdout
