"""A base given by hub id, found in the local Hugging Face cache (offline), or named by the adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import FP32_TOLERANCE, make_adapter, peft_logits
from huggingface_hub import constants
from typer.testing import CliRunner

import adaptrix
from adaptrix.cli import app

runner = CliRunner()
REPO = "tiny-org/tiny-llama"


def _cache(base: Path, root: Path) -> Path:
    """The base laid out as huggingface_hub caches a download: blobs, a snapshot of links, refs/main."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in base.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def cached(bases, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    base = bases("llama")
    snapshot = _cache(base, tmp_path / "hub")
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    return base, snapshot, adapter


def test_a_base_given_by_hub_id_compiles_from_the_local_cache(cached, tmp_path):
    base, snapshot, adapter = cached
    result = runner.invoke(app, ["compile", str(adapter), "--base", REPO, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert str(snapshot) in json.dumps(manifest)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        found = merged(input_ids=ids).logits
        expected = peft_logits("llama", base, adapter, {"input_ids": ids})
    assert (found - expected).abs().max() <= FP32_TOLERANCE


def test_without_base_the_adapters_own_cached_base_is_used(cached, tmp_path):
    _, _, adapter = cached
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = REPO
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = adaptrix.compile_adapter(adapter, None, "hooks", tmp_path / "hooks")
    assert result.sites > 0
    report = adaptrix.parity(adapter, None, ["merged"])
    assert report.ok


def test_an_id_the_cache_does_not_hold_is_named_with_the_fix(cached, tmp_path):
    _, _, adapter = cached
    result = runner.invoke(
        app, ["compile", str(adapter), "--base", "nobody/absent", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--base 'nobody/absent' is no directory, and the local Hugging Face cache has no" in result.output
    assert "hf download" in result.output and not (tmp_path / "o").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../../etc"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["compile", str(adapter), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "neither a directory nor a hub id" in result.output
