"""Inputs that lie are refused before anything is written: base checkpoints, configs, numbers, patterns.

Each case takes a valid base or adapter, makes it lie in one way, and compiles it: exit 2, one
line on stderr, no output. Where a lie is not caught, the rule it would break is that the merged
output loads with transformers with no missing or unexpected keys and computes finite numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from builders import build_base, make_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adaptrix.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    """A single-file llama base and a LoRA on its attention projections."""
    base = bases("llama")
    adapter = make_adapter("llama", base, tmp_path_factory.mktemp("hostile") / "adapter", seed=3,
                           target_modules=["q_proj", "v_proj"])  # fmt: skip
    return base, adapter


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, llama):
    """A llama base in several shards with its index (the same adapter fits it)."""
    return build_base("llama", tmp_path_factory.mktemp("sharded") / "base", shard="20KB")


def compile_to(adapter: Path, base: Path, out: Path, *extra: str):
    """Run `adaptrix compile ... --target merged`."""
    return runner.invoke(app, ["compile", str(adapter), "--base", str(base), "--target", "merged",
                               "-o", str(out), *extra])  # fmt: skip


def refused(result, out: Path, *words: str) -> str:
    """The compile exited 2 with one error line (holding `words`) and wrote nothing."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.adaptrix-*"))
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def copy_base(base: Path, tmp: Path) -> Path:
    """A writable copy of a base directory."""
    return Path(shutil.copytree(base, tmp / "base"))


def read_shard(file: Path) -> tuple[dict, bytes]:
    """A safetensors file's header and data."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_shard(file: Path, header: dict, data: bytes) -> None:
    """Write a safetensors file from a (possibly lying) header and data."""
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(file: Path, edit) -> None:
    """Change a safetensors file's header in place with `edit(header)`; the data stay as they are."""
    header, data = read_shard(file)
    edit(header)
    write_shard(file, header, data)


# Base checkpoints: the safetensors header


def test_a_negative_shape_is_refused(llama, tmp_path):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)

    def negate(header):  # [32] -> [-1, -32]: the same element count, an impossible shape
        header["model.norm.weight"]["shape"] = [-1, -32]

    edit_header(base / "model.safetensors", negate)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "model.norm.weight")


def test_an_overflowing_shape_is_refused(llama, tmp_path):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)

    def empty_but_huge(header):  # no bytes, since one dimension is 0; the other overflows int64
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
        header["model.extra"] = {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [end, end]}

    edit_header(base / "model.safetensors", empty_but_huge)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "model.extra")


def test_overlapping_tensor_bytes_are_refused(llama, tmp_path):
    """Layer 1's untouched k_proj built from layer 0's bytes: today written, exit 0."""
    adapter, base = llama[1], copy_base(llama[0], tmp_path)
    file = base / "model.safetensors"
    header, data = read_shard(file)
    one, zero = "model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    begin, end = header[one]["data_offsets"]
    header[one]["data_offsets"] = header[zero]["data_offsets"]
    for entry in header.values():  # close the hole its own bytes leave, so that only the overlap lies
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [x - (end - begin) for x in entry["data_offsets"]]
    write_shard(file, header, data[:begin] + data[end:])
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "overlaps")


def test_offsets_outside_the_file_are_refused(llama, tmp_path):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)
    file = base / "model.safetensors"
    header, data = read_shard(file)
    write_shard(file, header, data[:-64])
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "model.safetensors")


# Base checkpoints: the index


def edit_index(base: Path, edit) -> None:
    """Change a sharded base's index in place with `edit(weight_map)`."""
    file = base / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    edit(index["weight_map"])
    file.write_text(json.dumps(index))


def test_an_index_that_leaves_a_tensor_out_is_refused(llama, sharded, tmp_path):
    base = copy_base(sharded, tmp_path)
    edit_index(base, lambda m: m.pop("model.layers.1.mlp.up_proj.weight"))
    refused(
        compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", "model.layers.1.mlp.up_proj.weight"
    )


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(llama, sharded, tmp_path):
    base = copy_base(sharded, tmp_path)
    edit_index(base, lambda m: m.update({"model.layers.1.mlp.extra.weight": m["model.norm.weight"]}))
    refused(compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", "model.layers.1.mlp.extra.weight")


def test_an_index_putting_a_tensor_in_the_wrong_shard_is_refused(llama, sharded, tmp_path):
    base = copy_base(sharded, tmp_path)
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))

    def move(weight_map):
        name = next(k for k, v in weight_map.items() if v == shards[0])
        weight_map[name] = shards[1]

    edit_index(base, move)
    refused(compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", "index.json")


def _point_shard_at(base: Path, first: str, spelled) -> None:
    """Make the index name shard `first` as `spelled(first)`, in every entry of that shard."""
    edit_index(base, lambda m: m.update({k: spelled(first) for k, v in m.items() if v == first}))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_an_index_naming_a_shard_outside_the_base_is_refused(llama, sharded, tmp_path, how):
    base = copy_base(sharded, tmp_path)
    first = sorted(base.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    moved = Path(shutil.move(first, outside / first.name))
    if how == "dotdot":
        _point_shard_at(base, first.name, lambda name: f"../elsewhere/{name}")
    elif how == "absolute":
        _point_shard_at(base, first.name, lambda name: str(moved))
    else:
        os.symlink(moved, first)
    refused(compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", "outside the base directory")


def test_a_hugging_face_cache_snapshot_with_links_to_its_blobs_compiles(llama, sharded, tmp_path):
    """The hub cache links each snapshot file to ../../blobs: that is not an escape."""
    repo = tmp_path / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in sharded.iterdir():
        blob = Path(shutil.copy(file, blobs / f"blob-{file.name}"))
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    result = compile_to(llama[1], snapshot, tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_an_index_with_a_non_string_shard_is_refused(llama, sharded, tmp_path):
    base = copy_base(sharded, tmp_path)
    edit_index(base, lambda m: m.update({"model.norm.weight": 7}))
    refused(compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", "model.norm.weight")


def test_a_base_with_both_a_single_file_and_an_index_is_refused(llama, sharded, tmp_path):
    base = copy_base(sharded, tmp_path)
    shutil.copy(llama[0] / "model.safetensors", base / "model.safetensors")
    refused(compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", "ambiguous")


# Base checkpoints: config.json against the weights


def edit_config(base: Path, **changes) -> None:
    """Change a base's config.json."""
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    (base / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"num_hidden_layers": 4}, "4 layers"),
        ({"num_hidden_layers": 1}, "1 layers"),
        ({"hidden_size": 64, "head_dim": 8}, "lm_head.weight is [128, 64]"),
        ({"vocab_size": 200}, "lm_head.weight is [200, 32]"),
        ({"intermediate_size": 48}, "mlp"),
        ({"num_key_value_heads": 4}, "k_proj"),
    ],
    ids=["more-layers", "fewer-layers", "hidden", "vocab", "intermediate", "kv-heads"],
)
def test_a_config_that_disagrees_with_the_weights_is_refused(llama, tmp_path, changes, word):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)
    edit_config(base, **changes)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", word)


def test_weights_missing_a_layer_tensor_are_refused(llama, tmp_path):
    """A layer without its up_proj: transformers would report it missing and initialise it randomly."""
    adapter, base = llama[1], copy_base(llama[0], tmp_path)
    file = base / "model.safetensors"
    header, data = read_shard(file)
    gone = "model.layers.1.mlp.up_proj.weight"
    begin, end = header.pop(gone)["data_offsets"]
    for entry in header.values():
        if "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [x - (end - begin) for x in entry["data_offsets"]]
    write_shard(file, header, data[:begin] + data[end:])
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "mlp.up_proj")


def test_a_sharded_merge_loads_with_no_missing_or_unexpected_keys(llama, sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    result = compile_to(llama[1], sharded, tmp_path / "out")
    assert result.exit_code == 0, result.output
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info


# Non-finite or absurd numbers


def edit_adapter_config(adapter: Path, tmp: Path, text_edit=None, **changes) -> Path:
    """A copy of an adapter with its adapter_config.json changed (as values, or as raw text)."""
    copy = Path(shutil.copytree(adapter, tmp / "adapter"))
    file = copy / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    text = json.dumps(config)
    file.write_text(text_edit(text) if text_edit else text)
    return copy


@pytest.mark.parametrize(
    ("spelled", "word"),
    [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "Infinity"), ("1e400", "1e400"),
     ("1e300", "scale"), ('"nan"', "lora_alpha"), ("true", "lora_alpha")],
    ids=["nan", "inf", "-inf", "1e400", "1e300", "nan-string", "bool"],
)  # fmt: skip
def test_an_absurd_lora_alpha_is_refused(llama, tmp_path, spelled, word):
    """Today NaN merges at scale 1 and Infinity or 1e300 merge to inf weights, with exit 0."""
    base, adapter = llama
    bad = edit_adapter_config(
        adapter, tmp_path, lambda t: t.replace('"lora_alpha": 8', f'"lora_alpha": {spelled}')
    )
    assert spelled in (bad / "adapter_config.json").read_text()
    refused(compile_to(bad, base, tmp_path / "out"), tmp_path / "out", word)


def test_an_absurd_alpha_pattern_is_refused(llama, tmp_path):
    base, adapter = llama
    bad = edit_adapter_config(adapter, tmp_path, alpha_pattern={"v_proj": 1e300})
    refused(compile_to(bad, base, tmp_path / "out"), tmp_path / "out", "v_proj", "scale")


def _deep(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("where", ["adapter_config", "base_config", "index", "adapter_header"])
def test_deep_nesting_and_infinity_in_any_json_are_refused(llama, sharded, tmp_path, where):
    base, adapter = llama
    if where == "adapter_config":
        adapter = edit_adapter_config(adapter, tmp_path, lambda t: t[:-1] + f', "deep": {_deep(100_000)}}}')
    elif where == "base_config":
        base = copy_base(base, tmp_path)
        text = (base / "config.json").read_text().rstrip()
        (base / "config.json").write_text(text[:-1] + ', "rope_theta": Infinity}')
    elif where == "index":
        base = copy_base(sharded, tmp_path)
        file = base / "model.safetensors.index.json"
        file.write_text(file.read_text().rstrip()[:-1] + f', "deep": {_deep(100_000)}}}')
    else:
        adapter = Path(shutil.copytree(adapter, tmp_path / "adapter"))
        file = adapter / "adapter_model.safetensors"
        header, data = read_shard(file)
        text = json.dumps(header)[:-1] + f', "deep": {_deep(100_000)}}}'
        file.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out")


def _poison(base: Path, tensor: str, change) -> None:
    """Change one tensor of a single-file base in place: change(header_entry, data) -> data."""
    file = base / "model.safetensors"
    header, data = read_shard(file)
    write_shard(file, header, change(header[tensor], bytearray(data)))


def test_a_touched_base_tensor_holding_nan_is_refused_by_name(llama, tmp_path):
    base, adapter = copy_base(llama[0], tmp_path), llama[1]
    name = "model.layers.1.self_attn.v_proj.weight"

    def nan(entry, data):
        begin = entry["data_offsets"][0]
        data[begin : begin + 4] = struct.pack("<f", float("nan"))
        return bytes(data)

    _poison(base, name, nan)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", name, "NaN")


def test_a_touched_base_tensor_of_integer_dtype_is_refused_by_name(llama, tmp_path):
    base, adapter = copy_base(llama[0], tmp_path), llama[1]
    name = "model.layers.0.self_attn.q_proj.weight"

    def as_int(entry, data):
        entry["dtype"] = "I32"  # the same bytes, read as integers
        return bytes(data)

    _poison(base, name, as_int)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", name, "int32")


def test_a_merge_that_overflows_the_output_dtype_is_refused(llama, tmp_path):
    """A scale under the bound can still overflow float16: the merged tensor is checked."""
    base, adapter = llama
    bad = edit_adapter_config(adapter, tmp_path, lora_alpha=3.9e6)  # scale 975000, under the bound
    refused(compile_to(bad, base, tmp_path / "out", "--dtype", "float16"), tmp_path / "out", "NaN or Inf")


def test_a_damaged_hash_cache_is_ignored(llama, tmp_path, monkeypatch):
    base, adapter = llama
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "adaptrix" / "sha256.json"
    cache.parent.mkdir(parents=True)
    entries = {str(f.resolve()): 5 for f in [*base.iterdir(), *adapter.iterdir()]}
    cache.write_text(json.dumps(entries))
    assert compile_to(adapter, base, tmp_path / "out").exit_code == 0
    cache.write_text(_deep(100_000))
    assert compile_to(adapter, base, tmp_path / "again").exit_code == 0


# Sizes


def test_a_vera_rank_of_millions_is_refused_before_allocating(llama, tmp_path):
    from builders import load_model
    from peft import VeraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base = llama[0]
    model = get_peft_model(load_model("llama", base), VeraConfig(r=4, target_modules=["q_proj"],
                                                                  save_projection=False))  # fmt: skip
    adapter = tmp_path / "vera"
    model.save_pretrained(adapter)
    rank = 3_000_000  # regenerated projections [r, 32] and [32, r]: 768 MB before any check today
    tensors = {
        k: (torch.ones(rank) if "lambda_d" in k else v)
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    save_file(tensors, adapter / "adapter_model.safetensors")
    bad = edit_adapter_config(adapter, tmp_path / "edited", r=rank)
    refused(compile_to(bad, base, tmp_path / "out"), tmp_path / "out", f"r={rank}")


# Regular expressions from configs

LLAMA_KEYS = [f"model.layers.{i}.{m}" for i in (0, 1, 12) for m in
              ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]  # fmt: skip
KEY_PATTERNS = ["q_proj", "v_proj", r"layers\.1\..*", ".*proj", "(q|v)_proj", "mlp", "layers.0.mlp.up_proj",
                r"model\.layers\.\d+\.self_attn\.(q|k)_proj", "up", "[a-z_]+", "(?i)Q_PROJ", "", "proj$",
                "^model.*", "a|b|.*down_proj"]  # fmt: skip


def test_config_patterns_match_exactly_as_peft_does():
    """target_modules / exclude_modules (fullmatch), rank_pattern keys, layers_pattern: PEFT's results."""
    import re

    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from adaptrix.frontends.peft import patterns

    for pattern in KEY_PATTERNS:
        patterns.check(pattern, "target_modules")
        for key in LLAMA_KEYS:
            assert patterns.fullmatch(pattern, key) == bool(re.fullmatch(pattern, key)), (pattern, key)
    for keys in (KEY_PATTERNS, KEY_PATTERNS[::-1], ["v_proj", "proj"]):
        for key in LLAMA_KEYS:
            assert patterns.pattern_key(dict.fromkeys(keys), key) == get_pattern_key(keys, key), key
    for layers_pattern in (None, "layers", ["model", "layers"], "lay.rs", ["self_attn"], "s|layers"):
        fields = {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1],
                  "layers_pattern": layers_pattern, "exclude_modules": None}  # fmt: skip
        config = type("Config", (), fields)()
        for key in LLAMA_KEYS:
            ours = patterns.layer_index(layers_pattern, key) == 1 and key.endswith(("q_proj", "down_proj"))
            assert ours == bool(check_target_module_exists(config, key)), (layers_pattern, key)


CATASTROPHIC = "(.+)+Z"  # Python's re takes 2**n steps on a name of n characters without a Z


def test_a_catastrophic_target_pattern_finishes(tmp_path):
    """Today `re.fullmatch("(.+)+Z", key)` runs for hours on a 40-character module name."""
    import subprocess
    import sys

    script = (
        "from pathlib import Path\n"
        "from adaptrix.frontends.peft.config import read_lora_settings\n"
        "settings = read_lora_settings(Path('.'))\n"
        "print(settings.targets('model.layers.0.self_attn.q_proj_and_more_x', True),"
        " settings.rank('model.layers.0.self_attn.q_proj_and_more_x'))\n"
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": CATASTROPHIC,
              "rank_pattern": {CATASTROPHIC: 2}}  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    import adaptrix

    env = {**os.environ, "PYTHONPATH": str(Path(adaptrix.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.stdout.split() == ["False", "4"], done.stderr


def test_a_catastrophic_rank_pattern_compiles_with_peft_semantics(llama, tmp_path):
    base, adapter = llama
    bad = edit_adapter_config(adapter, tmp_path, rank_pattern={CATASTROPHIC: 2}, alpha_pattern={"(a+)+b": 3})
    result = compile_to(bad, base, tmp_path / "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("field", "value", "word"),
    [
        ("target_modules", r"(q)_proj\1", "bounded time"),
        ("target_modules", r"(?=q).*_proj", "bounded time"),
        ("exclude_modules", r"(?<!x)v_proj", "bounded time"),
        ("rank_pattern", {r"(?!k)q_proj": 2}, "bounded time"),
        ("layers_pattern", "(?P<idx>x)", "layers_pattern"),  # PEFT's own form fails on it
        ("layers_pattern", ["(a)\\1"], "bounded time"),
        ("target_modules", "q_proj|" * 400 + "v_proj", "characters"),
        ("rank_pattern", {f"m{i}": 2 for i in range(3000)}, "3000 patterns"),
        ("target_modules", "(unclosed", "not a valid regular expression"),
    ],
    ids=["backreference", "lookahead", "lookbehind", "rank-lookahead", "group-clash", "layers-backref",
         "too-long", "too-many", "invalid"],
)  # fmt: skip
def test_a_pattern_that_cannot_run_in_bounded_time_is_refused(llama, tmp_path, field, value, word):
    base, adapter = llama
    changes = {field: value, "layers_to_transform": [0]} if field == "layers_pattern" else {field: value}
    bad = edit_adapter_config(adapter, tmp_path, **changes)
    refused(compile_to(bad, base, tmp_path / "out"), tmp_path / "out", word)


def test_an_index_that_leaves_a_whole_shard_out_is_refused(llama, sharded, tmp_path):
    """A shard the index never names is never read: its tensors would be missing from the output."""
    base = copy_base(sharded, tmp_path)
    last = sorted(p.name for p in base.glob("model-*.safetensors"))[-1]
    edit_index(base, lambda m: [m.pop(k) for k in [k for k, v in m.items() if v == last]])
    refused(compile_to(llama[1], base, tmp_path / "out"), tmp_path / "out", last)


def test_a_config_with_a_trillion_layers_is_refused_at_once(llama, tmp_path):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)
    edit_config(base, num_hidden_layers=10**12)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "layers")


def test_an_air_op_with_an_absurd_scale_is_refused(llama, tmp_path):
    base, adapter = llama
    air = tmp_path / "adapter.air.safetensors"
    result = runner.invoke(app, ["convert", str(adapter), "--to", "air", "-o", str(air), "--base", str(base)])
    assert result.exit_code == 0, result.output

    def absurd(header):
        ops = json.loads(header["__metadata__"]["ops"])
        ops[0]["scale"] = 1e300
        header["__metadata__"]["ops"] = json.dumps(ops)

    edit_header(air, absurd)
    refused(compile_to(air, base, tmp_path / "out"), tmp_path / "out", "scale")


@pytest.mark.parametrize(
    "changes",
    [{"r": 10**400}, {"lora_alpha": 10**400}, {"rank_pattern": {"q_proj": 10**30}},
     {"alpha_pattern": {"q_proj": -(10**400)}}, {"use_rslora": True, "r": 2**60}],
    ids=["r", "alpha", "rank-pattern", "alpha-pattern", "rslora"],
)  # fmt: skip
def test_integers_too_large_for_a_float_are_refused(llama, tmp_path, changes):
    base, adapter = llama
    bad = edit_adapter_config(adapter, tmp_path, **changes)
    refused(compile_to(bad, base, tmp_path / "out"), tmp_path / "out")


@pytest.mark.parametrize(
    "edits", [{"scaling": 1e300}, {"reduction_factor": 10**400}, {"scaling": -(10**400)}],
    ids=["scaling", "huge-factor", "huge-int-scaling"],
)  # fmt: skip
def test_an_adapterhub_config_with_absurd_numbers_is_refused(bases, tmp_path, edits):
    from hub_builders import SeqBnConfig, save_hub

    base = bases("llama")
    adapter = save_hub("llama", base, SeqBnConfig(reduction_factor=4), tmp_path / "hub")[0]
    file = adapter / "adapter_config.json"
    saved = json.loads(file.read_text())
    saved["config"].update(edits)
    file.write_text(json.dumps(saved))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["compile", str(adapter), "--base", str(base), "--target", "hooks", "-o", str(out)]
    )
    refused(result, out)


def test_a_tensor_of_a_layer_far_beyond_the_config_is_refused(llama, tmp_path):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)

    def renamed(header):  # layer 1's norm renamed into layer 99999999999: layer 1 lacks it now
        far, near = "model.layers.99999999999.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
        header[far] = header.pop(near)

    edit_header(base / "model.safetensors", renamed)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "layers")


def test_a_tensor_name_with_a_newline_is_refused_in_one_line(llama, tmp_path):
    adapter, base = llama[1], copy_base(llama[0], tmp_path)

    def newline(header):
        header["model.norm.weight\nerror: fake"] = header.pop("model.norm.weight")

    edit_header(base / "model.safetensors", newline)
    refused(compile_to(adapter, base, tmp_path / "out"), tmp_path / "out", "control characters")


CONFIG_LIES = st.fixed_dictionaries(
    {},
    optional={
        "num_hidden_layers": st.integers(1, 3),
        "hidden_size": st.sampled_from([16, 32, 64]),
        "num_attention_heads": st.sampled_from([2, 4, 8]),
        "num_key_value_heads": st.sampled_from([1, 2, 4]),
        "intermediate_size": st.sampled_from([32, 64]),
        "vocab_size": st.sampled_from([64, 128]),
        "head_dim": st.sampled_from([4, 8, 16]),
        "tie_word_embeddings": st.booleans(),
    },
)


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(changes=CONFIG_LIES)
def test_a_compiled_base_config_loads_with_no_missing_or_unexpected_keys(llama, tmp_path_factory, changes):
    """The rule itself: whatever the config says, the output loads cleanly with transformers or is refused."""
    from transformers import AutoModelForCausalLM

    adapter, tmp = llama[1], tmp_path_factory.mktemp("lie")
    base = copy_base(llama[0], tmp)
    edit_config(base, **changes)
    out = tmp / "out"
    result = compile_to(adapter, base, out)
    if result.exit_code != 0:
        refused(result, out)
        return
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), (changes, info)
