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
from builders import build_base, make_adapter
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
