"""Hostile compiled artifacts: hooks bundles, `.onnx_adapter` files and ONNX artifact side files.

A bundle is checked whole before anything is attached: a misfit raises one BadInputError line
naming the bundle and leaves the model exactly as it was (hook dicts, parameter objects and
values), for attach and for switch alike. An ONNX artifact whose manifest, configs or adapter
files were tampered with is refused by `adaptrix run` with exit 2 and one line. `inspect`
describes a real `.onnx_adapter` file.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import load_model, make_adapter, sample_inputs
from onnx_builders import two_adapter_unmerged
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import adaptrix
import adaptrix.cli.run
from adaptrix.api.compile import compile_adapter
from adaptrix.cli import app
from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.onnx.session import open_onnx

runner = CliRunner()
attach_module = importlib.import_module("adaptrix.runtimes.hooks.attach")
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")  # fmt: skip


# ---------------------------------------------------------------- hooks bundles


@pytest.fixture(scope="module")
def bundle(bases, tmp_path_factory):
    """A llama base and a bundle of 14 LoRA modules plus lm_head replaced (modules_to_save)."""
    base = bases("llama")
    tmp = tmp_path_factory.mktemp("hostile-bundle")
    adapter = make_adapter("llama", base, tmp / "adapter", modules_to_save=["lm_head"])
    compile_adapter(adapter, base, "hooks", tmp / "bundle")
    return base, tmp / "bundle"


def model_state(model: torch.nn.Module) -> dict:
    """Everything attach may touch: each module's hook dicts, its parameter objects and values."""
    state = {}
    for name, module in model.named_modules():
        hooks = tuple(dict(getattr(module, attr)) if isinstance(getattr(module, attr), dict)
                      else set(getattr(module, attr)) for attr in HOOK_DICTS)  # fmt: skip
        params = {
            key: (id(p), None if p is None else p.detach().clone()) for key, p in module._parameters.items()
        }
        state[name] = (hooks, params)
    return state


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = model_state(model)
    assert after.keys() == before.keys()
    for name, (hooks, params) in before.items():
        assert after[name][0] == hooks, f"{name}: hooks changed"
        now = after[name][1]
        assert now.keys() == params.keys(), name
        for key, (ident, value) in params.items():
            assert now[key][0] == ident, f"{name}.{key}: parameter object replaced"
            assert value is None or torch.equal(now[key][1], value), f"{name}.{key}: values changed"


def edit_manifest(bundle: Path, edit) -> Path:
    file = bundle / "manifest.json"
    manifest = json.loads(file.read_text())
    edit(manifest["bundle"])
    file.write_text(json.dumps(manifest))
    return bundle


def entry_of(section: dict, suffix: str) -> dict:
    return next(entry for entry in section["modules"] if entry["name"].endswith(suffix))


def _replace_missing_parameter(bundle: Path, tmp: Path):
    """The issue's case: lm_head's `replace` names a parameter the module lacks."""
    entry = lambda s: entry_of(s, "lm_head")  # noqa: E731
    edit_manifest(
        bundle, lambda s: entry(s).__setitem__("replace", {"nonexistent": entry(s)["replace"]["weight"]})
    )
    return "has no parameter 'nonexistent'"


def _tensors_file_up(bundle: Path, tmp: Path):
    shutil.copy(bundle / "bundle.safetensors", tmp / "outside.safetensors")
    edit_manifest(bundle, lambda s: s.__setitem__("tensors_file", "../outside.safetensors"))
    return "inside the bundle"


def _tensors_file_absolute(bundle: Path, tmp: Path):
    shutil.copy(bundle / "bundle.safetensors", tmp / "outside.safetensors")
    edit_manifest(bundle, lambda s: s.__setitem__("tensors_file", str(tmp / "outside.safetensors")))
    return "inside the bundle"


def _tensors_file_symlink_escape(bundle: Path, tmp: Path):
    shutil.move(bundle / "bundle.safetensors", tmp / "outside.safetensors")
    (bundle / "bundle.safetensors").symlink_to(tmp / "outside.safetensors")
    return "outside the bundle"


def _probe_index_outside_weight(bundle: Path, tmp: Path):
    """On a module that attach does not probe (one of 15, 8 probed): only a whole check sees it."""
    edit_manifest(bundle, lambda s: s["modules"][1]["probe"]["indices"].__setitem__(0, 10**6))
    return "probe index"


def _probe_index_beyond_int64(bundle: Path, tmp: Path):
    def edit(section):
        entry = section["modules"][1]
        entry["weight_shape"], entry["out_features"] = [2**40, 2**40], 2**40
        entry["probe"]["indices"][0] = 2**70

    edit_manifest(bundle, edit)
    return "probe index|below 2"


def _probe_missing(bundle: Path, tmp: Path):
    edit_manifest(bundle, lambda s: s["modules"][1].pop("probe"))
    return "probe"


def _sites_not_a_list(bundle: Path, tmp: Path):
    edit_manifest(bundle, lambda s: s["modules"][1].__setitem__("sites", "layer 0 mlp_down"))
    return "sites"


def _fractional_shape(bundle: Path, tmp: Path):
    edit_manifest(bundle, lambda s: s["modules"][0].__setitem__("weight_shape", [16.5, 32]))
    return "weight_shape"


def _rank_as_text(bundle: Path, tmp: Path):
    edit_manifest(bundle, lambda s: s["modules"][1]["lora"].__setitem__("rank", "4"))
    return "rank"


def _nan_in_manifest(bundle: Path, tmp: Path):
    file = bundle / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["bundle"]["modules"][1]["probe"]["values"][0] = float("nan")
    file.write_text(json.dumps(manifest))
    return "NaN"


def _tensor_of_another_dtype(bundle: Path, tmp: Path):
    tensors = load_file(bundle / "bundle.safetensors")
    key = next(k for k in tensors if k.endswith("lora_up"))
    tensors[key] = tensors[key].to(torch.float16)
    save_file(tensors, bundle / "bundle.safetensors")
    return "float16"


def _tensor_nobody_uses(bundle: Path, tmp: Path):
    tensors = load_file(bundle / "bundle.safetensors")
    tensors["stowaway"] = torch.zeros(3)
    save_file(tensors, bundle / "bundle.safetensors")
    return "stowaway"


def _module_twice(bundle: Path, tmp: Path):
    edit_manifest(bundle, lambda s: s["modules"].append(dict(s["modules"][0])))
    return "twice"


def _manifest_symlink_escape(bundle: Path, tmp: Path):
    shutil.move(bundle / "manifest.json", tmp / "manifest.json")
    (bundle / "manifest.json").symlink_to(tmp / "manifest.json")
    return "outside the bundle"


HOSTILE_BUNDLES = [_replace_missing_parameter, _tensors_file_up, _tensors_file_absolute,
                   _tensors_file_symlink_escape, _probe_index_outside_weight, _probe_index_beyond_int64,
                   _probe_missing,
                   _sites_not_a_list, _fractional_shape, _rank_as_text, _nan_in_manifest,
                   _tensor_of_another_dtype, _tensor_nobody_uses, _module_twice,
                   _manifest_symlink_escape]  # fmt: skip


def refuse_untouched(model, bundle_dir: Path, match: str, attach=adaptrix.attach) -> str:
    """Attaching raises one BadInputError line naming the bundle; the model is exactly as it was."""
    before, handles = model_state(model), adaptrix.attached(model)
    with torch.no_grad():
        logits = model(**sample_inputs("llama")).logits
    with pytest.raises(BadInputError, match=match) as error:
        attach(model, bundle_dir)
    line = error.value.line()
    assert "\n" not in line and str(bundle_dir) in line, line
    assert_same_state(model, before)
    assert adaptrix.attached(model) == handles
    with torch.no_grad():
        assert torch.equal(model(**sample_inputs("llama")).logits, logits)
    return line


@pytest.mark.parametrize("corrupt", HOSTILE_BUNDLES, ids=[f.__name__.strip("_") for f in HOSTILE_BUNDLES])
def test_hostile_bundle_is_refused_and_the_model_untouched(corrupt, bundle, tmp_path):
    base, valid = bundle
    bad = Path(shutil.copytree(valid, tmp_path / "bundle"))
    match = corrupt(bad, tmp_path)
    model = load_model("llama", base)
    refuse_untouched(model, bad, match)
    handle = adaptrix.attach(model, valid)  # the same model still takes a good bundle
    refuse_untouched(model, bad, match, attach=adaptrix.switch)
    assert adaptrix.attached(model) == [handle]


def test_failed_switch_keeps_the_attached_bundle_and_its_hooks(bundle, tmp_path):
    base, valid = bundle
    bad = Path(shutil.copytree(valid, tmp_path / "bundle"))
    _replace_missing_parameter(bad, tmp_path)
    model = load_model("llama", base)
    handle = adaptrix.attach(model, valid)
    refuse_untouched(model, bad, "nonexistent", attach=adaptrix.switch)
    assert adaptrix.attached(model) == [handle] and handle.attached
    handle.detach()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _FailingHook(attach_module.ModuleHook):
    """A hook whose sixth construction fails: an error nobody foresaw, in the middle of attaching."""

    made = 0

    def __init__(self, *args, **kwargs):
        type(self).made += 1
        if type(self).made == 6:
            raise RuntimeError("out of memory")
        super().__init__(*args, **kwargs)


@pytest.mark.parametrize("how", ["attach", "switch"])
def test_an_error_while_attaching_rolls_everything_back(how, bundle, monkeypatch):
    base, valid = bundle
    model = load_model("llama", base)
    handle = adaptrix.attach(model, valid)
    if how == "attach":
        handle.detach()
    monkeypatch.setattr(attach_module, "ModuleHook", _FailingHook)
    _FailingHook.made = 0
    line = refuse_untouched(model, valid, "out of memory", attach=getattr(adaptrix, how))
    assert "left unchanged" in line
    assert adaptrix.attached(model) == ([] if how == "attach" else [handle])


@pytest.fixture(scope="module")
def hub_bundle(bases, tmp_path_factory):
    """A llama base and a bundle of AdapterHub bottlenecks (SeqBn)."""
    from hub_builders import SeqBnConfig, save_hub

    base = bases("llama")
    tmp = tmp_path_factory.mktemp("hostile-hub")
    adapter = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp / "adapter")[0]
    compile_adapter(adapter, base, "hooks", tmp / "bundle")
    return base, tmp / "bundle"


HOSTILE_BOTTLENECKS = {
    "residual-arg-the-forward-lacks": (lambda b: b["modules"].__setitem__("residual_arg", 3), "arguments"),
    "flag-as-text": (lambda b: b.__setitem__("parallel", "false"), "true or false"),
    "size-as-float": (lambda b: b.__setitem__("size", 8.0), "size"),
    "norm-tensor-without-its-norm": (lambda b: b["tensors"].update(ln_after_weight=b["tensors"]["up"]),
                                     "without the norm"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE_BOTTLENECKS))
def test_hostile_bottleneck_entry_is_refused(case, hub_bundle, tmp_path):
    base, valid = hub_bundle
    edit, match = HOSTILE_BOTTLENECKS[case]
    bad = edit_manifest(
        Path(shutil.copytree(valid, tmp_path / "bundle")), lambda s: edit(s["bottlenecks"][1])
    )
    refuse_untouched(load_model("llama", base), bad, match)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "1e999", "much"])
def test_a_scale_that_is_not_a_finite_number_is_refused(scale, bundle):
    base, valid = bundle
    model = load_model("llama", base)
    before = model_state(model)
    with pytest.raises(BadInputError, match="not a finite number"):
        adaptrix.attach(model, valid, scale=scale)
    assert_same_state(model, before)
    handle = adaptrix.attach(model, valid)
    with pytest.raises(BadInputError, match="not a finite number"):
        handle.scale = scale
    assert handle.scale == 1.0


# ---------------------------------------------------------------- ONNX artifacts given to `run`


@pytest.fixture(scope="module")
def unmerged(bases, tmp_path_factory):
    """A llama onnx-cpu --unmerged artifact with adapters `one` and `two`."""
    base = bases("llama")
    tmp = tmp_path_factory.mktemp("hostile-onnx")
    return two_adapter_unmerged(base, tmp)


def undecodable_name(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[data.find(b"model.layers.")] = 0xFF
    file.write_bytes(bytes(data))


def _edit(path: str, edit):
    def apply(artifact: Path) -> None:
        file = artifact / path
        value = json.loads(file.read_text())
        edit(value)
        file.write_text(json.dumps(value))

    return apply


def _write(path: str, text: str):
    return lambda artifact: (artifact / path).write_text(text)


def _lora(edit):
    return _edit("manifest.json", lambda m: edit(m["onnx"]["lora"]))


ONE, EOS, UP = ("--adapter", "one"), ("--stop-at-eos",), "../x/adapters/one.onnx_adapter"
HOSTILE_ARTIFACTS = {
    "config-not-an-object": (_write("config.json", "[1, 2]"), ()),
    "config-not-json": (_write("config.json", "{"), ()),
    "config-nested-deeply": (_write("config.json", "[" * 100_000 + "]" * 100_000), ()),
    "config-nan": (_write("config.json", '{"vocab_size": NaN}'), ()),
    "config-vocab-text": (_write("config.json", '{"vocab_size": "many"}'), ()),
    "generation-not-an-object": (_write("generation_config.json", "[1]"), EOS),
    "generation-not-json": (_write("generation_config.json", '{"eos'), EOS),
    "generation-eos-object": (_edit("generation_config.json", lambda c: c.update(eos_token_id={"a": 1})),
                              EOS),
    "generation-eos-text": (_edit("generation_config.json", lambda c: c.update(eos_token_id="x")),
                            EOS),
    "genai-not-json": (_write("genai_config.json", "{"), ()),
    "manifest-nan": (_write("manifest.json", '{"target": "onnx-cpu", "onnx": {"task": NaN}}'), ()),
    "manifest-lora-list": (_edit("manifest.json", lambda m: m["onnx"].update(lora=[1])), ()),
    "manifest-lora-text": (_edit("manifest.json", lambda m: m["onnx"].update(lora="x")), ONE),
    "manifest-inputs-list": (_lora(lambda lora: lora.update(inputs=[1])), ()),
    "manifest-adapters-list": (_lora(lambda lora: lora.update(adapters=[1])), ONE),
    "manifest-file-absolute": (_lora(lambda lora: lora["adapters"]["one"].update(file="/etc/passwd")),
                               ONE),
    "manifest-file-up": (_lora(lambda lora: lora["adapters"]["one"].update(file=UP)), ONE),
    "manifest-file-number": (_lora(lambda lora: lora["adapters"]["one"].update(file=3)), ONE),
    "manifest-no-model-version": (_lora(lambda lora: lora.pop("model_version")), ONE),
    "manifest-model-version-text": (_lora(lambda lora: lora.update(model_version="x")), ONE),
    "manifest-input-shape-number": (_lora(lambda lora: next(iter(lora["inputs"].values())).update(shape=5)),
                                    ONE),
    "manifest-no-outputs": (_edit("manifest.json", lambda m: m["onnx"].update(outputs=[])), ()),
    "manifest-task-list": (_edit("manifest.json", lambda m: m["onnx"].update(task=["x"])), ()),
    "adapter-name-undecodable": (lambda a: undecodable_name(a / "adapters" / "one.onnx_adapter"),
                                 ONE),
}  # fmt: skip


def assert_one_line_exit_2(result, named: object) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(named) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", sorted(HOSTILE_ARTIFACTS))
def test_tampered_artifact_is_one_line_exit_2(case, unmerged, tmp_path):
    tamper, extra = HOSTILE_ARTIFACTS[case]
    (tmp_path / "x" / "adapters").mkdir(parents=True)  # what "../x/..." would reach
    shutil.copy(unmerged / "adapters" / "one.onnx_adapter", tmp_path / "x" / "adapters")
    artifact = Path(shutil.copytree(unmerged, tmp_path / "artifact"))
    tamper(artifact)
    result = runner.invoke(
        app, ["run", str(artifact), "--prompt-ids", "5,6", "--max-new-tokens", "2", *extra]
    )
    assert_one_line_exit_2(result, artifact)


def test_adapter_file_with_an_undecodable_name_is_refused(unmerged, tmp_path):
    file = Path(shutil.copy(unmerged / "adapters" / "two.onnx_adapter", tmp_path / "bad.onnx_adapter"))
    undecodable_name(file)
    with pytest.raises(BadInputError, match="not UTF-8") as error:
        open_onnx(unmerged).load_adapter(file)
    assert str(file) in error.value.line()
    result = runner.invoke(app, ["run", str(unmerged), "--prompt-ids", "5,6", "--adapter", str(file)])
    assert_one_line_exit_2(result, file)
    assert_one_line_exit_2(runner.invoke(app, ["inspect", str(file)]), file)


def test_adapter_file_holding_nan_is_refused(unmerged, tmp_path):
    read = ort.AdapterFormat.read_adapter(str(unmerged / "adapters" / "two.onnx_adapter"))
    params = {name: value.numpy().copy() for name, value in read.get_parameters().items()}
    next(iter(params.values()))[0, 0] = np.nan
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(read.get_model_version())
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    writer.export_adapter(str(tmp_path / "nan.onnx_adapter"))
    with pytest.raises(BadInputError, match="NaN or Inf"):
        open_onnx(unmerged).load_adapter(tmp_path / "nan.onnx_adapter")


# ---------------------------------------------------------------- inspect


def test_inspect_describes_a_compiled_onnx_adapter(unmerged, tmp_path):
    manifest = json.loads((unmerged / "manifest.json").read_text())["onnx"]["lora"]
    file = unmerged / "adapters" / "two.onnx_adapter"
    result = runner.invoke(app, ["inspect", str(file), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "onnx-adapter"
    assert summary["model_version"] == manifest["model_version"]
    rows = {row["module"]: row for row in summary["rows"]}
    expected = {f"{module}.lora_{half}" for module in manifest["adapters"]["two"]["ranks"] for half in "AB"}
    assert set(rows) == expected
    q_a = rows["model.layers.0.self_attn.q_proj.lora_A"]
    assert q_a["shape"] == [32, 2] and q_a["dtype"] == "float32" and q_a["rank"] == 2
    assert q_a["parameters"] == 64 and q_a["bytes"] == 256 and q_a["layer"] == 0 and q_a["op"] == "lora_A"
    assert rows["model.layers.1.self_attn.v_proj.lora_B"]["shape"] == [2, 16]
    assert summary["parameters"] == sum(row["parameters"] for row in rows.values())
    assert summary["bytes"] == 4 * summary["parameters"] and summary["layers"] == [0, 1]
    table = runner.invoke(app, ["inspect", str(file)], terminal_width=200)
    assert table.exit_code == 0 and "_proj.lora_A" in table.stdout, table.output
    assert "32x2" in table.stdout and "float32" in table.stdout  # the shape and dtype columns
    assert f"model version {manifest['model_version']}" in table.stdout
    truncated = tmp_path / "truncated.onnx_adapter"
    truncated.write_bytes(file.read_bytes()[:100])
    assert_one_line_exit_2(runner.invoke(app, ["inspect", str(truncated)]), truncated)
