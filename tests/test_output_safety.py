"""Nothing of the user's is lost: -o never replaces an input or a folder Adaptrix did not write."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import make_adapter, prompts_file
from typer.testing import CliRunner

from adaptrix import convert_adapter
from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app
from adaptrix.ir.errors import BadInputError

MARKER = ".adaptrix-temporary"  # what proves a temporary sibling is Adaptrix's own


@pytest.fixture
def case(bases, tmp_path):
    """A private copy of a tiny llama base (a test may try to destroy it) and an adapter for it."""
    base = Path(shutil.copytree(bases("llama"), tmp_path / "base"))
    return base, make_adapter("llama", base, tmp_path / "adapter")


def digests(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder, by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cli(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def refused(result, *named: object) -> str:
    """Exit 2 with one line on stderr that names each of `named`; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    assert "; " in lines[0], f"no fix in: {lines[0]}"
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Adaptrix's temporary siblings in `folder`, after giving a watcher time to act."""
    for _ in range(500):
        found = sorted(p.name for p in folder.iterdir() if ".adaptrix-" in p.name)
        if not found:
            return []
        time.sleep(0.01)
    return found


def dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# 1. The output is compared with the inputs as resolved, not as spelled.


def test_output_spelled_through_dotdot_never_replaces_the_base(case, tmp_path):
    base, adapter = case
    before = digests(base)
    (tmp_path / "x").mkdir()
    result = cli("compile", adapter, "--base", base, "-o", tmp_path / "x" / ".." / "base", "--force")
    refused(result, "input")
    assert digests(base) == before and leftovers(tmp_path) == []


def test_base_through_a_symlink_is_still_an_input(case, tmp_path):
    base, adapter = case
    before = digests(base)
    (tmp_path / "link").symlink_to(base)
    result = cli("compile", adapter, "--base", tmp_path / "link", "-o", base, "--force")
    refused(result, "input")
    assert digests(base) == before and leftovers(tmp_path) == []


def test_the_adapter_is_never_moved_aside(case, tmp_path):
    base, adapter = case
    before = digests(adapter)
    result = cli("compile", adapter, "--base", base, "-o", adapter / ".." / "adapter", "--force")
    refused(result, "input")
    assert digests(adapter) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("inside", ["base", "adapter"])
def test_an_output_inside_an_input_is_refused(case, tmp_path, inside):
    base, adapter = case
    folder = {"base": base, "adapter": adapter}[inside]
    before = digests(folder)
    refused(cli("compile", adapter, "--base", base, "-o", folder / "out"), "inside", folder)
    assert digests(folder) == before


def test_convert_to_air_never_overwrites_an_input_file(case, tmp_path):
    base, adapter = case
    weights = base / "model.safetensors"
    before = digests(base)
    result = cli("convert", adapter, "--to", "air", "--base", base, "-o", weights, "--force")
    refused(result, "input")
    assert digests(base) == before and leftovers(base) == []


def test_convert_to_peft_never_replaces_an_input(case, tmp_path):
    base, adapter = case
    before = digests(adapter)
    result = cli(
        "convert", adapter, "--to", "peft", "--base", base, "-o", adapter / ".." / "adapter", "--force"
    )
    refused(result, "input")
    assert digests(adapter) == before and leftovers(tmp_path) == []


def artifact_holding(path: Path, base: Path, adapter: Path, file: str) -> Path:
    """An Adaptrix merged output into which the user put a file of their own."""
    compile_adapter(adapter, base, "merged", path)
    prompts_file(path / file, 4)
    return path / file


def test_a_calibration_file_inside_the_output_is_an_input(case, tmp_path):
    base, adapter = case
    art = tmp_path / "art"
    prompts = artifact_holding(art, base, adapter, "prompts.json")
    before = digests(art)
    result = cli("compile", adapter, "--base", base, "--target", "onnx-cpu", "--quantize", "int4",
                 "--calibration", prompts, "-o", art, "--force")  # fmt: skip
    refused(result, "input", prompts)
    assert digests(art) == before


def test_files_a_pass_reads_are_inputs(case, tmp_path):
    base, adapter = case
    art = tmp_path / "art"
    prompts = artifact_holding(art, base, adapter, "prompts.json")
    before = digests(art)
    spec = f"distill:source={art},prompts={prompts},steps=1,generate=2"
    result = cli(
        "compile", adapter, "--base", base, "--target", "hooks", "--pass", spec, "-o", art, "--force"
    )
    refused(result, "input")
    assert digests(art) == before


def test_parity_work_dir_inside_an_input_is_refused(case, tmp_path):
    base, adapter = case
    before = digests(adapter)
    result = cli("parity", adapter, "--base", base, "--targets", "hooks", "--work-dir", adapter)
    refused(result, "input")
    assert digests(adapter) == before


# 2. --force replaces only an empty folder or what Adaptrix wrote.


def test_force_refuses_a_folder_adaptrix_did_not_write(case, tmp_path):
    base, adapter = case
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = digests(mine)
    line = refused(cli("compile", adapter, "--base", base, "-o", mine, "--force"), mine)
    assert "Adaptrix" in line and "manifest.json" in line
    assert digests(mine) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "manifest",
    [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"target": "merged"}),
        json.dumps({"adaptrix_version": "0"}),
    ],
    ids=["malformed", "not-an-object", "no-version", "no-target"],
)
def test_force_refuses_a_folder_whose_manifest_is_not_adaptrix(case, tmp_path, manifest):
    base, adapter = case
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(manifest)
    (mine / "data.bin").write_bytes(b"\x01" * 10)
    before = digests(mine)
    refused(cli("compile", adapter, "--base", base, "-o", mine, "--force"), mine)
    assert digests(mine) == before


def test_force_replaces_an_empty_folder_and_an_adaptrix_output(case, tmp_path):
    base, adapter = case
    out = tmp_path / "out"
    out.mkdir()
    compile_adapter(adapter, base, "hooks", out, force=True)
    compile_adapter(adapter, base, "merged", out, force=True)
    assert json.loads((out / "manifest.json").read_text())["target"] == "merged"
    assert leftovers(tmp_path) == []


def test_convert_force_replaces_only_what_adaptrix_wrote(case, tmp_path):
    base, adapter = case
    air, peft = tmp_path / "a.air", tmp_path / "peft"
    convert_adapter(adapter, "air", air, base=base)
    convert_adapter(adapter, "air", air, base=base, force=True)  # an AIR file Adaptrix wrote
    convert_adapter(adapter, "peft", peft, base=base)
    convert_adapter(adapter, "peft", peft, base=base, force=True)  # a PEFT folder Adaptrix wrote
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BadInputError, match="not an AIR file"):
        convert_adapter(adapter, "air", notes, base=base, force=True)
    assert notes.read_bytes() == b"\x02\x00\x00\x00\x00\x00\x00\x00{}" and leftovers(tmp_path) == []


# 3. Stale clean-up deletes only Adaptrix's own temporaries.


def test_stale_cleanup_spares_folders_that_only_match_the_name(case, tmp_path):
    base, adapter = case
    pid = dead_pid()
    lookalikes = [tmp_path / f".out.adaptrix-old-{pid}", tmp_path / f".out.adaptrix-tmp-{pid}"]
    for folder in lookalikes:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"precious")
    ours = tmp_path / f".out.adaptrix-tmp-{dead_pid()}"
    ours.mkdir()
    (ours / MARKER).write_text(ours.name.rsplit("-", 1)[1])
    (ours / "half-written").write_bytes(b"\x00" * 8)
    compile_adapter(adapter, base, "hooks", tmp_path / "out")
    for folder in lookalikes:
        assert (folder / "adapter_model.safetensors").read_bytes() == b"precious"
    assert not ours.exists()


def test_an_output_a_killed_run_moved_aside_is_put_back(case, tmp_path):
    base, adapter = case
    out, pid = tmp_path / "out", dead_pid()
    compile_adapter(adapter, base, "hooks", out)
    before = digests(out)
    aside = tmp_path / f".out.adaptrix-old-{pid}"
    out.rename(aside)
    (aside / MARKER).write_text(str(pid))
    refused(cli("compile", adapter, "--base", base, "-o", out), out, "already exists")
    assert digests(out) == before
    assert leftovers(tmp_path) == []


# 4. -o a symlink.


def test_output_through_a_symlink_replaces_its_target(case, tmp_path):
    base, adapter = case
    real, link = tmp_path / "real", tmp_path / "link"
    compile_adapter(adapter, base, "hooks", real)
    link.symlink_to(real)
    result = cli("compile", adapter, "--base", base, "--target", "merged", "-o", link, "--force")
    assert result.exit_code == 0, (result.output, result.exception)
    assert link.is_symlink() and link.resolve() == real
    assert json.loads((real / "manifest.json").read_text())["target"] == "merged"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_a_dangling_symlink_is_refused(case, tmp_path):
    base, adapter = case
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "deeper")
    refused(cli("compile", adapter, "--base", base, "-o", link), link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and leftovers(tmp_path) == []


# 5. One writer per output at a time.


def test_a_compile_is_refused_while_another_writes_the_same_output(case, tmp_path):
    base, adapter = case
    out = tmp_path / "out"
    with (tmp_path / ".out.adaptrix-lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(cli("compile", adapter, "--base", base, "-o", out), out, "another")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".out." in p.name] in ([], [".out.adaptrix-lock"])


def test_an_output_made_meanwhile_is_never_replaced(case, tmp_path):
    base, adapter = case
    out = tmp_path / "out"

    def someone_else_writes(done: int, total: int) -> None:
        out.mkdir(exist_ok=True)

    with pytest.raises(BadInputError, match="meanwhile"):
        compile_adapter(adapter, base, "merged", out, progress=someone_else_writes)
    assert out.is_dir() and list(out.iterdir()) == [] and leftovers(tmp_path) == []


# 6. The ONNX cache is written as atomically as an output.

_KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from adaptrix.targets.onnx import export
from adaptrix.io.checkpoint import Checkpoint

def killed(base, task, dtype, into):
    (into / "model.onnx").write_bytes(b"half an export")
    os.kill(os.getpid(), signal.SIGKILL)

export._export = killed
export.export_base(Checkpoint(sys.argv[1]), "float32", cache_dir=sys.argv[2])
"""


@pytest.mark.onnx_export
def test_a_killed_export_leaves_nothing_in_the_cache(bases, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(bases("gpt2")), str(cache)],
                             env=env, capture_output=True, check=False)  # fmt: skip
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
    assert leftovers(cache) == [] and list(cache.iterdir()) == []


@pytest.mark.onnx_export
def test_the_next_export_removes_a_killed_runs_leftovers(bases, tmp_path, monkeypatch):
    from adaptrix.io.checkpoint import Checkpoint
    from adaptrix.targets.onnx import export

    def fake(base, task, dtype, into):
        (into / export.MODEL_NAME).write_bytes(b"graph")

    monkeypatch.setattr(export, "_export", fake)
    cache, pid = tmp_path / "cache", dead_pid()
    killed, foreign = cache / f".0123.adaptrix-tmp-{pid}", cache / f".4567.adaptrix-tmp-{pid}"
    for folder in (killed, foreign):
        folder.mkdir(parents=True)
        (folder / "model.onnx_data").write_bytes(b"\x00" * 64)
    (killed / MARKER).write_text(str(pid))
    made = export.export_base(Checkpoint(bases("gpt2")), "float32", cache_dir=cache)
    assert (made.path / export.MODEL_NAME).read_bytes() == b"graph"
    assert not killed.exists() and (foreign / "model.onnx_data").is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([made.path.name, foreign.name])


def test_an_adapters_label_is_its_resolved_folders_name(tmp_path):
    from adaptrix.api.compile import adapter_label

    (tmp_path / "legal" / "sub").mkdir(parents=True)
    assert adapter_label(tmp_path / "legal" / "sub" / "..", set()) == "legal"
