"""Bad input: exit code 2, one line on stderr naming the file and the fix, no traceback, no output."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import FP32_TOLERANCE, load_model, make_adapter, model_logits, peft_logits, sample_inputs
from peft import OFTConfig, get_peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adaptrix import compile_adapter
from adaptrix.cli import app

WEIGHTS = "adapter_model.safetensors"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def valid(bases, tmp_path_factory):
    """A small llama base and a valid LoRA adapter for it, shared by the module."""
    base = bases("llama")
    return base, make_adapter("llama", base, tmp_path_factory.mktemp("errors") / "adapter")


def _copy(adapter: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(adapter, tmp / "bad-adapter"))


def _rewrite(adapter: Path, edit) -> None:
    """Rewrite the adapter's safetensors with `edit(tensors)` applied."""
    tensors = load_file(adapter / WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# Each case takes (valid base, valid adapter, tmp_path, bases), corrupts a copy and returns
# (adapter, base, extra CLI args, what the one-line message must name).
def _config_missing(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    (bad / "adapter_config.json").unlink()
    return bad, base, [], bad


def _config_not_json(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    (bad / "adapter_config.json").write_text('{"r": 4, "peft_type": ')
    return bad, base, [], bad / "adapter_config.json"


def _oft(base, adapter, tmp, bases):
    config = OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_model("llama", base), config)
    model.save_pretrained(tmp / "oft")
    return tmp / "oft", base, [], tmp / "oft" / "adapter_config.json"


def _wrong_r(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    _edit_json(bad / "adapter_config.json", r=8)
    return bad, base, [], bad / WEIGHTS


def _truncated(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    return bad, base, [], bad / WEIGHTS


def _garbage(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    (bad / WEIGHTS).write_bytes(random.Random(0).randbytes(4096))
    return bad, base, [], bad / WEIGHTS


def _weights_missing(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    (bad / WEIGHTS).unlink()
    return bad, base, [], bad


def _module_removed(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    _rewrite(bad, lambda t: [t.pop(k) for k in list(t) if k.startswith(Q_PROJ + ".")])
    return bad, base, [], bad / WEIGHTS


def _lora_b_removed(base, adapter, tmp, bases):
    bad = _copy(adapter, tmp)
    _rewrite(bad, lambda t: t.pop(f"{Q_PROJ}.lora_B.weight"))
    return bad, base, [], bad / WEIGHTS


def _poisoned(value: float):
    def case(base, adapter, tmp, bases):
        bad = _copy(adapter, tmp)
        _rewrite(bad, lambda t: t[f"{Q_PROJ}.lora_A.weight"].view(-1).__setitem__(3, value))
        return bad, base, [], bad / WEIGHTS

    return case


def _other_arch(base, adapter, tmp, bases):
    gpt2 = make_adapter("gpt2", bases("gpt2"), tmp / "gpt2-adapter")
    return gpt2, base, [], gpt2 / WEIGHTS


def _other_size(base, adapter, tmp, bases):
    wide = make_adapter("llama", bases("llama", "hidden48", hidden_size=48), tmp / "wide")
    return wide, base, [], wide / WEIGHTS


def _base_missing(base, adapter, tmp, bases):
    return adapter, tmp / "no-such-base", [], tmp / "no-such-base"


def _unknown_model_type(base, adapter, tmp, bases):
    odd = Path(shutil.copytree(base, tmp / "odd-base"))
    _edit_json(odd / "config.json", model_type="not_a_family")
    return adapter, odd, [], odd / "config.json"


def _other_family(base, adapter, tmp, bases):
    odd = Path(shutil.copytree(base, tmp / "odd-base"))
    _edit_json(odd / "config.json", model_type="mamba")  # a family transformers has, other weights
    return adapter, odd, [], odd / "config.json"


def _unknown_target(base, adapter, tmp, bases):
    return adapter, base, ["--target", "tflite"], "tflite"


def _unknown_dtype(base, adapter, tmp, bases):
    return adapter, base, ["--dtype", "int3"], "int3"


CASES = {
    "config-missing": _config_missing,
    "config-not-json": _config_not_json,
    "peft-type-oft": _oft,
    "r-mismatch": _wrong_r,
    "truncated-safetensors": _truncated,
    "garbage-safetensors": _garbage,
    "weights-missing": _weights_missing,
    "module-removed": _module_removed,
    "lora-b-removed": _lora_b_removed,
    "nan-weight": _poisoned(float("nan")),
    "inf-weight": _poisoned(float("inf")),
    "other-architecture": _other_arch,
    "other-size": _other_size,
    "base-missing": _base_missing,
    "unknown-model-type": _unknown_model_type,
    "config-of-another-family": _other_family,
    "unknown-target": _unknown_target,
    "unknown-dtype": _unknown_dtype,
}


def _compile(adapter: Path, base: Path, out: Path, *extra: str):
    args = ["compile", str(adapter), "--base", str(base), "-o", str(out), *extra]
    return CliRunner().invoke(app, args)


def assert_refused(result, out: Path, named: object) -> str:
    """Exit 2, one line on stderr that names `named`, no traceback, nothing written beside `out`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(named) in lines[0], (named, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.adaptrix-*")), "a temporary sibling was left"
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused(case, valid, bases, tmp_path):
    adapter, base, extra, named = CASES[case](*valid, tmp_path, bases)
    line = assert_refused(_compile(adapter, base, tmp_path / "out", *extra), tmp_path / "out", named)
    assert "; " in line.removeprefix(f"error: {named}"), f"no fix in: {line}"


def test_unknown_model_type_says_transformers_does_not_know_it(valid, bases, tmp_path):
    adapter, base, _, named = _unknown_model_type(*valid, tmp_path, bases)
    line = assert_refused(_compile(adapter, base, tmp_path / "out"), tmp_path / "out", named)
    assert "'not_a_family', which this transformers does not know" in line


def test_weights_of_another_family_are_refused(valid, bases, tmp_path):
    adapter, base, _, named = _other_family(*valid, tmp_path, bases)
    line = assert_refused(_compile(adapter, base, tmp_path / "out"), tmp_path / "out", named)
    assert "describes a mamba model, which has no tensor" in line


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile .bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(valid, tmp_path):
    base, adapter = valid
    bad = _copy(adapter, tmp_path)
    marker = tmp_path / "MARKER"
    state = dict(load_file(bad / WEIGHTS))
    state[f"{Q_PROJ}.lora_A.weight"] = _RunsCode(marker)
    torch.save(state, bad / "adapter_model.bin")
    (bad / WEIGHTS).unlink()
    assert_refused(_compile(bad, base, tmp_path / "out"), tmp_path / "out", bad / "adapter_model.bin")
    assert not marker.exists(), "the pickle ran code"


def test_existing_output_is_left_untouched(valid, tmp_path):
    base, adapter = valid
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _compile(adapter, base, out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(out) in lines[0] and "--force" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.adaptrix-*"))


def _console_script() -> str:
    beside = Path(sys.executable).parent / "adaptrix"
    found = str(beside) if beside.is_file() else shutil.which("adaptrix")
    assert found is not None, (
        "the adaptrix console script is not installed (see pyproject's [project.scripts])"
    )
    return found


def test_real_process_prints_one_line(valid, tmp_path):
    base, adapter = valid
    bad = _copy(adapter, tmp_path)
    (bad / WEIGHTS).write_bytes(b"\x00" * 3)
    out = tmp_path / "out"
    args = [_console_script(), "compile", str(bad), "--base", str(base), "-o", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad / WEIGHTS) in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.adaptrix-*"))


def test_valid_bin_adapter_matches_peft(valid, tmp_path):
    base, _ = valid
    adapter = make_adapter("llama", base, tmp_path / "adapter", safe=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / WEIGHTS).exists()
    compile_adapter(adapter, base, "merged", tmp_path / "merged")
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, adapter, inputs)
    assert (model_logits("llama", base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    assert (model_logits("llama", tmp_path / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE
