"""Reliability: a compile killed with SIGKILL leaves nothing behind; the same inputs give the same bytes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builders import build_base, make_adapter
from transformers import LlamaConfig, LlamaForCausalLM

from adaptrix import convert_adapter
from adaptrix.api.compile import compile_adapter
from adaptrix.io.output import MARKER

# Big enough (about 110 MB of float32) that a merged compile takes a while to write.
SLOW_BASE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=8000)  # fmt: skip


@pytest.fixture(scope="module")
def slow_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SLOW_BASE)).save_pretrained(root / "base")
    adapter = make_adapter("llama", root / "base", root / "adapter", seed=2)
    return root / "base", adapter


def start_compile(adapter: Path, base: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "adaptrix", "compile", str(adapter), "--base", str(base), "--target",
               "merged", "-o", str(out), *extra]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_while_writing(process: subprocess.Popen, out: Path) -> None:
    """SIGKILL the compile once its temporary sibling holds a file being written."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        siblings = list(out.parent.glob(f".{out.name}.adaptrix-tmp-*"))
        # A file beside the marker: the watcher that cleans up after a kill starts once the marked
        # temporary exists, so a kill before the first write tests a leftover the next run removes.
        if siblings and any(p.name != MARKER for p in siblings[0].iterdir()):
            break
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.002)
    assert process.poll() is None, "the compile ended before it could be killed midway"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def strays(out: Path) -> list[str]:
    """Names of adaptrix's temporary siblings of `out`, after giving the watcher time to act."""
    for _ in range(500):
        found = sorted(p.name for p in out.parent.glob(f".{out.name}.adaptrix-*"))
        if not found:
            return []
        time.sleep(0.01)
    return found


def test_a_killed_compile_leaves_nothing_and_a_rerun_succeeds(slow_case, tmp_path):
    base, adapter = slow_case
    out = tmp_path / "user-folder" / "merged"
    process = start_compile(adapter, base, out)
    kill_while_writing(process, out)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists() and strays(out) == []
    assert sorted(p.name for p in out.parent.iterdir()) == []
    rerun = start_compile(adapter, base, out)
    assert rerun.wait() == 0, rerun.stderr.read().decode()
    assert (out / "manifest.json").is_file() and strays(out) == []


def test_a_killed_force_replace_keeps_the_previous_output(slow_case, tmp_path):
    base, adapter = slow_case
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    before = digests(out)
    process = start_compile(adapter, base, out, "--force")
    kill_while_writing(process, out)
    assert strays(out) == [] and digests(out) == before


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip


@pytest.mark.parametrize(
    ("target", "options"),
    [("merged", {}), ("hooks", {}), *(pytest.param("onnx-cpu", options, marks=pytest.mark.onnx_export)
                                      for options in ({}, {"unmerged": True}, {"quantize": "int4"}))],
    ids=["merged", "hooks", "onnx-cpu", "onnx-cpu-unmerged", "onnx-cpu-int4"],
)  # fmt: skip
def test_the_same_inputs_give_byte_identical_outputs(bases, tmp_path, target, options):
    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path / "adapter", seed=4)
    first, second = tmp_path / "first", tmp_path / "second"
    compile_adapter(adapter, base, target, first, **options)
    compile_adapter(adapter, base, target, second, **options)
    assert digests(first) == digests(second) and "manifest.json" in digests(first)


def test_a_hybrid_bundle_is_byte_identical(bases, tmp_path):
    """An AdapterHub LoRA + bottleneck adapter compiles to the same bundle bytes twice."""
    from hub_builders import ConfigUnion, LoRAConfig, SeqBnConfig, save_hub

    base = bases("llama")
    union = ConfigUnion(LoRAConfig(r=4, alpha=8), SeqBnConfig(reduction_factor=4))
    adapter, _ = save_hub("llama", base, union, tmp_path / "hub")
    compile_adapter(adapter, base, "hooks", tmp_path / "first")
    compile_adapter(adapter, base, "hooks", tmp_path / "second")
    assert digests(tmp_path / "first") == digests(tmp_path / "second")


def test_air_conversion_is_byte_identical(bases, tmp_path):
    base = bases("gpt2")
    adapter = make_adapter("gpt2", base, tmp_path / "adapter", seed=4)
    convert_adapter(adapter, "air", tmp_path / "a.air", base=base)
    convert_adapter(adapter, "air", tmp_path / "b.air", base=base)
    assert (tmp_path / "a.air").read_bytes() == (tmp_path / "b.air").read_bytes()
    assert not list(tmp_path.glob(".*adaptrix-*"))


def test_a_base_from_another_folder_builds_the_same_weights(tmp_path):
    """The merged weights depend on the inputs' bytes, not on where they lie."""
    base_a = build_base("llama", tmp_path / "a")
    base_b = build_base("llama", tmp_path / "b")
    adapter = make_adapter("llama", base_a, tmp_path / "adapter", seed=4)
    compile_adapter(adapter, base_a, "merged", tmp_path / "out-a")
    compile_adapter(adapter, base_b, "merged", tmp_path / "out-b")
    a, b = digests(tmp_path / "out-a"), digests(tmp_path / "out-b")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {
        k: v for k, v in b.items() if k != "manifest.json"
    }
