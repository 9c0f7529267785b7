"""Fuzzing compiled artifacts: mutated hooks bundles and `.onnx_adapter` files never crash, hang or leak.

Bundles (a LoRA bundle with a replaced lm_head, and an AdapterHub bottleneck bundle) get one of:
a manifest value replaced or deleted anywhere in its tree, a safetensors header field replaced,
a byte changed, the file truncated, the header length changed, or files removed, added or swapped
for symlinks. Each goes to `adaptrix.attach` or `adaptrix.switch` (over an attached bundle) and
to `adaptrix inspect`: it attaches (and detaches back to the base, bit for bit), or it raises one
BadInputError line and the model is exactly as it was (hook dicts, parameter objects, values).

Adapter files get a byte changed, a truncation, renamed or re-typed parameters (names that are
not UTF-8 included), or another model version. Each goes to `OnnxArtifact.load_adapter`,
`adaptrix run --adapter FILE` and `adaptrix inspect FILE`: exit 0, or exit 2 with one line.
The artifact's own JSON files (manifest, configs) are fuzzed through `adaptrix run` too.
BUNDLE_EXAMPLES + ADAPTER_EXAMPLES + ARTIFACT_EXAMPLES inputs per run, derandomized.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import load_model, make_adapter, sample_inputs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx_builders import two_adapter_unmerged, write_onnx_adapter
from test_fuzz import json_values
from test_hostile_artifacts import assert_same_state, model_state
from typer.testing import CliRunner

import adaptrix
import adaptrix.cli.run
import adaptrix.runtimes.onnx.session as onnx_session
from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app
from adaptrix.ir.errors import BadInputError

runner = CliRunner()
BUNDLE_EXAMPLES = 260
ADAPTER_EXAMPLES = 260
ARTIFACT_EXAMPLES = 60
SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=SLOW_OK)
TENSORS = "bundle.safetensors"


def fresh(root: Path, source: Path) -> Path:
    """A copy of `source` at root/case, whatever the previous example left there."""
    case = root / "case"
    if case.is_symlink() or case.is_file():
        case.unlink()
    elif case.exists():
        shutil.rmtree(case)
    return Path(shutil.copytree(source, case, symlinks=True))


def json_paths(value, prefix=()) -> list[tuple]:
    """Every path into a JSON tree (keys and indices), the root's children first."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(json_paths(child, (*prefix, key)))
    return paths


def mutate_json(value, paths: list[tuple], pick: int, replacement, delete: bool):
    """Replace (or delete) the value at one path of a JSON tree, in place."""
    path = paths[pick % len(paths)]
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return value


def assert_one_line(result, code_ok=(0, 2)) -> None:
    """Exit 0, or exit 2 with exactly one `error:` line on stderr; never a traceback."""
    assert result.exit_code in code_ok, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


# ---------------------------------------------------------------- hooks bundles


@pytest.fixture(scope="module")
def bundles(bases, tmp_path_factory):
    """A llama base, its model with a pristine snapshot, and two bundles (LoRA + replace, bottleneck)."""
    from hub_builders import SeqBnConfig, save_hub

    base = bases("llama")
    tmp = tmp_path_factory.mktemp("fuzz-bundles")
    lora = make_adapter("llama", base, tmp / "lora", modules_to_save=["lm_head"], use_dora=True)
    compile_adapter(lora, base, "hooks", tmp / "lora-bundle")
    hub = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp / "hub")[0]
    compile_adapter(hub, base, "hooks", tmp / "hub-bundle")
    model = load_model("llama", base)
    sections = {}
    for name in ("lora-bundle", "hub-bundle"):
        section = json.loads((tmp / name / "manifest.json").read_text())["bundle"]
        sections[name] = json_paths(section)
    return model, model_state(model), tmp, sections


def _mutate_bundle(bundle: Path, outside: Path, paths: list, mode: str, pick: int, byte: int, value) -> None:
    tensors = bundle / TENSORS
    if mode in ("replace", "delete"):
        file = bundle / "manifest.json"
        manifest = json.loads(file.read_text())
        mutate_json(manifest["bundle"], paths, pick, value, mode == "delete")
        file.write_text(json.dumps(manifest))
    elif mode == "header":
        data = tensors.read_bytes()
        size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + size])
        names = sorted(k for k in header if k != "__metadata__")
        header[names[pick % len(names)]][["dtype", "shape", "data_offsets"][byte % 3]] = value
        text = json.dumps(header).encode()
        tensors.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    elif mode == "byte":
        data = bytearray(tensors.read_bytes())
        data[pick % len(data)] = byte
        tensors.write_bytes(bytes(data))
    elif mode == "truncate":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: pick % len(data)])
    elif mode == "length":
        data = bytearray(tensors.read_bytes())
        size = struct.unpack("<Q", data[:8])[0]
        data[:8] = struct.pack("<Q", (size + pick % 10_000 - 5_000) % (2**64))
        tensors.write_bytes(bytes(data))
    else:
        _mutate_files(bundle, outside, mode, pick)


def _mutate_files(bundle: Path, outside: Path, mode: str, pick: int) -> None:
    names = ["manifest.json", TENSORS]
    name = names[pick % 2]
    if mode == "remove":
        (bundle / name).unlink()
    elif mode == "extra":
        (bundle / f"extra-{pick % 7}.bin").write_bytes(bytes(pick % 256 for _ in range(pick % 50)))
    elif mode == "directory":
        (bundle / name).unlink()
        (bundle / name).mkdir()
    elif mode == "symlink-out":
        shutil.copy(bundle / name, outside / name)
        (bundle / name).unlink()
        (bundle / name).symlink_to(outside / name)
    elif mode == "symlink-loop":
        (bundle / name).unlink()
        (bundle / name).symlink_to(bundle / name)


BUNDLE_MODES = ["replace", "replace", "replace", "delete", "header", "byte", "truncate", "length", "remove",
                "extra", "directory", "symlink-out", "symlink-loop"]  # fmt: skip


@settings(FUZZ, max_examples=BUNDLE_EXAMPLES)
@given(
    which=st.sampled_from(["lora-bundle", "hub-bundle"]),
    how=st.sampled_from(["attach", "switch"]),
    mode=st.sampled_from(BUNDLE_MODES),
    pick=st.integers(0, 10**6),
    byte=st.integers(0, 255),
    value=json_values | st.integers(-(2**70), 2**70),
)
def test_generated_bundles_attach_or_leave_the_model_as_it_was(bundles, which, how, mode, pick, byte, value):
    model, pristine, tmp, sections = bundles
    outside = tmp / "outside"
    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir()
    bundle = fresh(tmp / "work", tmp / which)
    _mutate_bundle(bundle, outside, sections[which], mode, pick, byte, value)
    assert_one_line(runner.invoke(app, ["inspect", str(bundle), "--json"]))
    kept = adaptrix.attach(model, tmp / "lora-bundle") if how == "switch" else None
    before = model_state(model)
    try:
        handle = getattr(adaptrix, how)(model, bundle)
    except BadInputError as error:
        event(f"{mode}: refused")
        assert "\n" not in error.line() and str(bundle) in error.line(), error.line()
        assert_same_state(model, before)
        assert adaptrix.attached(model) == ([kept] if kept else [])
    else:
        event(f"{mode}: attached")
        with torch.no_grad():
            model(**sample_inputs("llama", batch=1, length=4))
        handle.detach()
    for left in adaptrix.attached(model):
        left.detach()
    assert_same_state(model, pristine)


# ---------------------------------------------------------------- .onnx_adapter files


@pytest.fixture(scope="module")
def artifact(bases, tmp_path_factory):
    """An unmerged llama onnx-cpu artifact (adapters one, two), opened once, and one's parameters."""
    base = bases("llama")
    tmp = tmp_path_factory.mktemp("fuzz-onnx")
    out = two_adapter_unmerged(base, tmp)
    opened = onnx_session.open_onnx(out)
    read = ort.AdapterFormat.read_adapter(str(out / "adapters" / "two.onnx_adapter"))
    params = {name: value.numpy().copy() for name, value in read.get_parameters().items()}
    return out, opened, params, read.get_model_version(), tmp


def _rewrite(params: dict, version: int, how: str, pick: int, text: str) -> tuple[dict, int]:
    """Parameters changed the way a hand-made or foreign adapter file differs: names, shapes, dtypes."""
    params = dict(params)
    name = sorted(params)[pick % len(params)]
    if how == "rename":
        params[text] = params.pop(name)
    elif how == "drop":
        del params[name]
    elif how == "shape":
        params[name] = np.zeros((pick % 5, pick % 3 + 1), np.float32)
    elif how == "dtype":
        params[name] = params[name].astype([np.float16, np.float64, np.int32][pick % 3])
    elif how == "nan":
        params[name] = params[name].copy()
        params[name].flat[pick % params[name].size] = [np.nan, np.inf, -np.inf][pick % 3]
    elif how == "version":
        version = pick
    elif how == "empty":
        params = {}
    return params, version


ADAPTER_MODES = ["byte", "byte", "byte", "truncate", "name-byte", "rename", "drop", "shape", "dtype", "nan",
                 "version", "empty"]  # fmt: skip


@settings(FUZZ, max_examples=ADAPTER_EXAMPLES)
@given(
    mode=st.sampled_from(ADAPTER_MODES),
    pick=st.integers(0, 10**6),
    byte=st.integers(0, 255),
    text=st.text(max_size=40),
)
def test_generated_adapter_files_load_or_are_refused(artifact, monkeypatch, mode, pick, byte, text):
    out, opened, params, version, tmp = artifact
    file = tmp / "cases" / f"{pick}-{mode}-{byte}.onnx_adapter"
    file.parent.mkdir(exist_ok=True)
    valid = (out / "adapters" / "two.onnx_adapter").read_bytes()
    if mode in ("byte", "truncate", "name-byte"):
        data = bytearray(valid)
        if mode == "truncate":
            data = data[: pick % len(data)]
        elif mode == "name-byte":  # inside a parameter's name
            start = data.find(b"model.layers.", pick % (len(data) - 64))
            data[(start if start >= 0 else data.find(b"model.layers.")) + pick % 13] = byte
        else:
            data[pick % len(data)] = byte
        file.write_bytes(bytes(data))
    else:
        write_onnx_adapter(file, *_rewrite(params, version, mode, pick, text))
    try:
        opened.load_adapter(file)
    except BadInputError as error:
        assert "\n" not in error.line() and str(file) in error.line(), error.line()
    monkeypatch.setattr(onnx_session, "open_onnx", lambda *args, **kwargs: opened)  # one session for all runs
    run = runner.invoke(app, ["run", str(out), "--prompt-ids", "5,6", "--max-new-tokens", "2",
                              "--adapter", str(file)])  # fmt: skip
    assert_one_line(run)
    event(f"{mode}: run exit {run.exit_code}")
    assert_one_line(runner.invoke(app, ["inspect", str(file), "--json"]))
    file.unlink()


# ---------------------------------------------------------------- the artifact's JSON files

SIDE_FILES = ["manifest.json", "config.json", "generation_config.json", "genai_config.json"]


@settings(FUZZ, max_examples=ARTIFACT_EXAMPLES)
@given(
    name=st.sampled_from(SIDE_FILES),
    pick=st.integers(0, 10**6),
    delete=st.booleans(),
    value=json_values,
    adapter=st.sampled_from([[], ["--adapter", "one"], ["--adapter", "two"], ["--stop-at-eos"]]),
)
def test_generated_artifact_files_run_or_are_refused(artifact, name, pick, delete, value, adapter):
    out, _, _, _, tmp = artifact
    copy = fresh(tmp / "work", out)
    file = copy / name
    content = json.loads(file.read_text())
    if name == "manifest.json":  # the onnx section is what `run` reads
        mutate_json(content["onnx"], json_paths(content["onnx"]), pick, value, delete)
    else:
        mutate_json(content, json_paths(content), pick, value, delete)
    file.write_text(json.dumps(content))
    result = runner.invoke(app, ["run", str(copy), "--prompt-ids", "5,6", "--max-new-tokens", "2", *adapter])
    assert_one_line(result)
    event(f"{name}: exit {result.exit_code}")
