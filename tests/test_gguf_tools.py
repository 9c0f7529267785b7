"""GGUF artifacts in the tools: `adaptrix parity --targets gguf`, `adaptrix run`, `adaptrix verify`."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from builders import load_model, make_adapter
from gguf_builders import save_tokenizer
from peft import PeftModel
from typer.testing import CliRunner

from adaptrix.api.compile import compile_adapter
from adaptrix.api.parity import parity
from adaptrix.api.verify import verify_artifact
from adaptrix.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    """A llama base with a tokenizer, an adapter, its merged f32 GGUF and its unmerged GGUF."""
    base = bases("llama", "gguf")
    if not (base / "tokenizer.json").is_file():
        save_tokenizer(base)
    torch.manual_seed(1)
    adapter = make_adapter("llama", base, tmp_path_factory.mktemp("gguf-tools") / "adapter")
    merged, unmerged = (
        tmp_path_factory.mktemp("gguf-merged") / "out",
        tmp_path_factory.mktemp("gguf-lora") / "out",
    )
    compile_adapter(adapter, base, "gguf", merged)
    cache = tmp_path_factory.mktemp("gguf-cache")
    compile_adapter(adapter, base, "gguf", unmerged, unmerged=True, cache_dir=cache)
    return base, adapter, merged, unmerged


def test_parity_runs_merged_and_unmerged_ggufs_with_llama_cpp_and_judges_them(llama):
    base, adapter, _, unmerged = llama
    report = parity(adapter, base, ["gguf"])
    (row,) = report.backends
    assert row.ok is True and row.dtype == "float32" and row.top1_agreement == 1.0, row
    assert row.max_abs < row.tolerance
    (given,) = parity(adapter, base, [], artifacts={"gguf": unmerged}).backends
    assert given.ok is True and "GGUF LoRA" in given.note, given


@torch.no_grad()
def test_cli_run_generates_pefts_greedy_tokens_merged_and_unmerged(llama):
    base, adapter, merged, unmerged = llama
    ids = [5, 6, 7, 8]
    model = PeftModel.from_pretrained(load_model("llama", base), adapter).eval()
    expected = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    expected = expected[0, len(ids) :].tolist()
    for artifact, chosen in ((merged, []), (unmerged, ["--adapter", adapter.name])):
        result = runner.invoke(app, ["run", str(artifact), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "3",
                                     "--json", *chosen])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"][0]["generated_ids"][: len(expected)] == expected
    refused = runner.invoke(app, ["run", str(unmerged), "--prompt-ids", "5,6", "--max-new-tokens", "2"])
    assert refused.exit_code == 2 and "--adapter" in refused.output
    text = runner.invoke(app, ["run", str(merged), "--prompt", "hi there", "--max-new-tokens", "2", "--json"])
    assert text.exit_code == 0, text.output
    from transformers import AutoTokenizer

    # llama.cpp's tokenizer, read from the GGUF's metadata, splits the text as the base's own does
    own = AutoTokenizer.from_pretrained(base)("hi there")["input_ids"]
    assert json.loads(text.stdout)["results"][0]["prompt_ids"] == own
    args = ["run", str(merged), "--prompt", "hi", "--chat", "--max-new-tokens", "2", "--json"]
    chat = runner.invoke(app, args)
    assert chat.exit_code == 0, chat.output
    templated = AutoTokenizer.from_pretrained(base).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    templated = templated["input_ids"] if isinstance(templated, dict) else templated
    assert json.loads(chat.stdout)["results"][0]["prompt_ids"] == list(templated)


def test_verify_checks_the_gguf_files_against_the_manifest(llama, tmp_path):
    _, _, merged, unmerged = llama
    assert verify_artifact(merged).ok
    assert verify_artifact(unmerged).ok
    import shutil

    copy = shutil.copytree(merged, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["gguf"]["tensors"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_artifact(copy).problems
    assert any("tensors, the manifest says" in line for line in problems), problems
