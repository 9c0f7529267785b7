"""The CLI against hostile or mistaken input: no code from inputs, one line per error, clear options."""

import ast
import builtins
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import make_adapter
from rich.console import Console
from typer.testing import CliRunner

import adaptrix
from adaptrix.api.compile import CompileResult, compile_adapter
from adaptrix.cli import app
from adaptrix.cli import compile as cli_compile
from adaptrix.ir.errors import BadInputError

runner = CliRunner()
PACKAGE = Path(adaptrix.__file__).parent

# ---------------------------------------------------------------- no code from inputs

EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def plant_remote_code(folder: Path, marker: Path, *, model: bool = False) -> Path:
    """`folder` asks transformers (auto_map) to import evil.py, which writes `marker` when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = {"model_type": "evil", "architectures": ["EvilForCausalLM"]}
    if model:
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
        )
    )
    return folder


@pytest.fixture
def answer_yes(monkeypatch):
    """A user who answers `y` to any question; the questions asked are recorded."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    return asked


class FakeDecoder:
    """What `run` needs of an opened ONNX artifact, without onnxruntime."""

    is_decoder, task, section = True, "text-generation-with-past", {"outputs": ["logits"]}

    def generate(self, ids, count, adapter=None, stop_at_eos=False):
        return [7, 8, 9][:count]


def test_run_never_runs_or_offers_the_artifacts_tokenizer_code(tmp_path, monkeypatch, answer_yes):
    monkeypatch.setattr("adaptrix.runtimes.onnx.session.open_onnx", lambda *args: FakeDecoder())
    marker = tmp_path / "remote-code-ran"
    artifact = plant_remote_code(tmp_path / "artifact", marker)
    result = runner.invoke(app, ["run", str(artifact), "--prompt-ids", "1,2", "--json"], input="y\n")
    assert result.exit_code == 0, result.output
    assert not marker.exists() and answer_yes == []
    assert json.loads(result.stdout)["results"][0]["generated_ids"] == [7, 8, 9]


BOOT = """
import sys
import adaptrix.runtimes.onnx.session

class FakeDecoder:
    is_decoder, task, section = True, "text-generation-with-past", {{}}

    def generate(self, ids, count, adapter=None, stop_at_eos=False):
        return [7, 8, 9]

adaptrix.runtimes.onnx.session.open_onnx = lambda *args: FakeDecoder()
from adaptrix.cli import main
sys.argv = ["adaptrix", "run", {artifact!r}, "--prompt-ids", "1,2", "--json"]
main()
"""


def test_run_json_stays_json_and_runs_no_code_as_a_process(tmp_path):
    """A real process, its stdin closed: nothing asked on stdout (which must parse), no code run."""
    marker = tmp_path / "remote-code-ran"
    artifact = plant_remote_code(tmp_path / "artifact", marker)
    boot = BOOT.format(artifact=str(artifact))
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    done = subprocess.run([sys.executable, "-c", boot], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert json.loads(done.stdout)["results"][0]["generated_ids"] == [7, 8, 9]
    assert "custom code" not in done.stdout
    assert "not decoding" in done.stderr and "auto_map" in done.stderr  # warnings: on stderr


def test_every_load_passes_trust_remote_code_false():
    """Each from_pretrained and main_export call in the package says trust_remote_code=False."""
    loads = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("from_pretrained", "main_export"):
                trust = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
                loads.append((f"{file.relative_to(PACKAGE)}:{node.lineno}", trust))
    assert len(loads) >= 6  # run's tokenizer, refit's tokenizer, load_auto, two PeftModel loads, main_export
    assert [where for where, trust in loads if not (trust and isinstance(trust[0], ast.Constant)
                                                     and trust[0].value is False)] == []  # fmt: skip


def test_loading_a_base_with_remote_code_refuses_without_asking(tmp_path, answer_yes):
    from adaptrix.calibration.models import load_auto

    marker = tmp_path / "remote-code-ran"
    base = plant_remote_code(tmp_path / "base", marker, model=True)
    with pytest.raises(ValueError, match="custom code"):
        load_auto(base)
    assert not marker.exists() and answer_yes == []


def test_calibration_text_never_runs_the_tokenizers_code(tmp_path, answer_yes):
    from adaptrix.calibration.prompts import _tokenize

    marker = tmp_path / "remote-code-ran"
    folder = plant_remote_code(tmp_path / "base", marker)
    with pytest.raises(BadInputError, match="need the base's tokenizer"):
        _tokenize(["hello"], folder, tmp_path / "prompts.txt", "--calibration")
    assert not marker.exists() and answer_yes == []


# ---------------------------------------------------------------- one line per error, exit 2


def one_error_line(result) -> str:
    """The single `error:` line a failed command printed (and no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    base = bases("llama")
    return base, make_adapter("llama", base, tmp_path_factory.mktemp("cli-hardening") / "adapter")


def compile_args(llama, out: Path, *extra: str) -> list[str]:
    base, adapter = llama
    return ["compile", str(adapter), "--base", str(base), "-o", str(out), *extra]


def test_disk_full_while_writing_the_manifest_is_one_line(llama, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name

    monkeypatch.setattr("adaptrix.api.compile.write_manifest", full)
    out = tmp_path / "out"
    line = one_error_line(runner.invoke(app, compile_args(llama, out)))
    assert "No space left on device (ENOSPC)" in line and str(out) in line and "free space" in line
    assert not out.exists()
    debug = runner.invoke(app, ["--debug", *compile_args(llama, out)])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "ENOSPC" in debug.stderr


ERRORS = {
    "permission": (PermissionError(errno.EACCES, "Permission denied", "/srv/x/adapter_config.json"),
                   ["/srv/x/adapter_config.json", "Permission denied (EACCES)", "permissions"]),
    "not-a-directory": (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/srv/file/x"),
                        ["/srv/file/x", "ENOTDIR", "regular file"]),
    "recursion": (RecursionError("maximum recursion depth exceeded"), ["RecursionError", "--debug"]),
    "overflow": (OverflowError("cannot convert float infinity to integer"),
                 ["OverflowError", "infinity", "--debug"]),
    "value": (ValueError("bad rank"), ["ValueError: bad rank", "--debug"]),
    "key": (KeyError("lora_A"), ["KeyError: lora_A", "--debug"]),
    "unicode": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ["UTF-8", "--debug"]),
    "type": (TypeError("unsupported operand"), ["TypeError", "--debug"]),
    "other": (RuntimeError("shape mismatch"), ["RuntimeError: shape mismatch", "--debug"]),
}  # fmt: skip


@pytest.mark.parametrize("kind", ERRORS)
def test_each_error_kind_is_one_actionable_line(kind, llama, tmp_path, monkeypatch):
    error, words = ERRORS[kind]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("adaptrix.api.compile.read_adapter", fail)
    line = one_error_line(runner.invoke(app, compile_args(llama, tmp_path / "out")))
    assert all(word in line for word in words), line


# Each command and the API call it makes (monkeypatched to fail).
COMMANDS = {
    "compile": ("adaptrix.api.compile.compile_adapter", ["compile", "a", "--base", "b", "-o", "o"]),
    "convert": ("adaptrix.api.convert.convert_adapter", ["convert", "a", "--to", "air", "-o", "o.air"]),
    "inspect": ("adaptrix.api.inspect.inspect_adapter", ["inspect", "a"]),
    "parity": ("adaptrix.api.parity.parity", ["parity", "a", "--base", "b"]),
    "verify": ("adaptrix.api.verify.verify_artifact", ["verify", "a"]),
    "run": ("adaptrix.runtimes.onnx.session.open_onnx", ["run", "a", "--prompt-ids", "1"]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_wraps_its_api_call(command, monkeypatch, tmp_path):
    api, args = COMMANDS[command]

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "/data/model.safetensors")

    monkeypatch.setattr(api, fail)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b").mkdir()  # the base, which compile resolves before the call
    line = one_error_line(runner.invoke(app, args))
    assert "/data/model.safetensors: Input/output error (EIO)" in line


def test_output_under_a_regular_file_is_one_line(llama, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    line = one_error_line(runner.invoke(app, compile_args(llama, tmp_path / "afile" / "out")))
    assert "afile" in line


def test_output_in_a_read_only_folder_is_one_line(llama, tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root: the mode stops nothing; the kernel's refusal is emulated
        real_mkdir = os.mkdir

        def refuse(path, *args, **kwargs):
            if Path(path).parent == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refuse)
    try:
        line = one_error_line(runner.invoke(app, compile_args(llama, folder / "out")))
        assert str(folder) in line and "Permission denied (EACCES)" in line and "permissions" in line
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_file_given_as_base_or_adapter_is_one_line(llama, tmp_path):
    base, adapter = llama
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_error_line(
        runner.invoke(app, ["compile", str(adapter), "--base", str(afile), "-o", str(tmp_path / "o")])
    )
    assert str(afile) in line
    line = one_error_line(
        runner.invoke(app, ["compile", str(afile), "--base", str(base), "-o", str(tmp_path / "o")])
    )
    assert str(afile) in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- what a new user meets


def test_the_api_takes_typed_keywords_a_misspelt_one_is_refused_by_python(llama, tmp_path):
    base, adapter = llama
    with pytest.raises(TypeError, match="unexpected keyword argument 'quantise'"):
        compile_adapter(adapter, base, "merged", tmp_path / "out", quantise="int4")
    with pytest.raises(BadInputError, match="--quantize does not apply to --target merged"):
        compile_adapter(adapter, base, "merged", tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["merged", "onnx-cuda"])
def test_quantize_hint_names_only_targets_that_take_it(target, llama, tmp_path):
    line = one_error_line(runner.invoke(app, compile_args(llama, tmp_path / "out", "--target", target,
                                                          "--quantize", "int4")))  # fmt: skip
    assert "onnx-cpu" in line and "onnx-cuda" not in line.split(";", 1)[1]


def test_quantized_summary_names_the_weights(llama, tmp_path, monkeypatch):
    def fake(adapters, base, target, out, **kwargs):
        return CompileResult(Path(out), target, "float32", ["model.onnx"], 14)

    monkeypatch.setattr("adaptrix.api.compile.compile_adapter", fake)
    result = runner.invoke(
        app, compile_args(llama, tmp_path / "out", "--target", "onnx-cpu", "--quantize", "int4")
    )
    assert result.exit_code == 0, result.output
    assert "(onnx-cpu, float32 activations, int4 weights, 14 sites)" in result.stdout
    plain = runner.invoke(app, compile_args(llama, tmp_path / "out", "--target", "onnx-cpu"))
    assert "(onnx-cpu, float32, 14 sites)" in plain.stdout


def test_help_shows_booleans_as_plain_flags():
    helps = {name: runner.invoke(app, [*name.split(), "--help"]) for name in ("", "compile", "run", "verify")}
    for name, result in helps.items():
        assert result.exit_code == 0, name
        assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout, name
    assert any(line.split()[:1] == ["--force"] for line in helps["compile"].stdout.splitlines())


def test_a_value_after_a_flag_is_explained(llama, tmp_path):
    line = one_error_line(runner.invoke(app, [*compile_args(llama, tmp_path / "out"), "--force", "true"]))
    assert "'true'" in line and "take no value" in line


def test_version_flag_and_command():
    for args in (["--version"], ["version"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.stdout.strip() == adaptrix.__version__


def test_compile_labels_each_phase_on_a_terminal_only(llama, tmp_path, monkeypatch):
    seen = {}

    def fake(adapters, base, target, out, *, progress=None, phase=None, **kwargs):
        seen["phase"] = phase
        if phase is not None:
            phase("exporting the base to ONNX (first compile for this base)")
            progress(10, 100)
        return CompileResult(Path(out), target, "float32", [], 1)

    monkeypatch.setattr("adaptrix.api.compile.compile_adapter", fake)
    assert runner.invoke(app, compile_args(llama, tmp_path / "a")).exit_code == 0
    assert seen["phase"] is None  # not a terminal: no bar, no labels
    screen = io.StringIO()
    monkeypatch.setattr(cli_compile, "err", Console(file=screen, force_terminal=True, width=120))
    assert runner.invoke(app, compile_args(llama, tmp_path / "b")).exit_code == 0
    assert "exporting the base to ONNX (first compile for this base)" in screen.getvalue()
    assert "0/?" not in screen.getvalue()


@pytest.mark.onnx_export
def test_onnx_compile_reports_its_phases(llama, tmp_path):
    base, adapter = llama
    labels = []
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", phase=labels.append,
                    quantize="int8")  # fmt: skip
    assert labels[0].startswith("exporting the base to ONNX (first compile for this base")
    assert [label.split()[0] for label in labels] == [
        "exporting",
        "merging",
        "quantizing",
        "writing",
        "hashing",
    ]
