"""Fuzzing the inputs: generated adapter configs, tensor headers and base configs never crash the compiler.

AdapterHub configs are fuzzed too (the hybrid adapters), and base checkpoints: their shards'
headers (fields, offsets, shapes, dtypes), their bytes, and the index. Each generated input either
compiles (exit 0, a complete output) or is refused: exit 2, one line on stderr starting with
"error:", no traceback, nothing written beside the output. A base that compiles gives an output
with exactly the base's tensor names and shapes. Hypothesis generates over 500 inputs per run
(FUZZ_EXAMPLES per strategy for the PEFT and base strategies, HUB_EXAMPLES for AdapterHub's).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from builders import make_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from typer.testing import CliRunner

from adaptrix.cli import app

runner = CliRunner()
FUZZ_EXAMPLES = 180
SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=SLOW_OK)  # fmt: skip
WEIGHTS = "adapter_model.safetensors"
CONFIG_KEYS = [
    "r", "lora_alpha", "target_modules", "peft_type", "use_rslora", "use_dora", "bias", "fan_in_fan_out",
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save",
    "task_type", "lora_dropout", "init_lora_weights", "exclude_modules", "layer_replication",
    "use_qalora", "target_parameters", "lora_bias", "megatron_config",
]  # fmt: skip
BASE_KEYS = [
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings", "architectures", "torch_dtype",
]  # fmt: skip
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["q_proj", "all-linear", ".*", "LORA", "LOHA", "CAUSAL_LM", "nan"]),
)  # fmt: skip
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)  # fmt: skip


@pytest.fixture(scope="module")
def valid(bases, tmp_path_factory):
    base = bases("llama")
    return base, make_adapter("llama", base, tmp_path_factory.mktemp("fuzz") / "adapter", seed=6)


def check(result, out: Path) -> None:
    """Exit 0 with a complete output, or exit 2 with one line and nothing written; never a crash."""
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.adaptrix-*")]
    assert not leftovers, leftovers
    if result.exit_code == 0:
        assert (out / "manifest.json").is_file()
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()


def compile_into(tmp: Path, adapter: Path, base: Path):
    out = tmp / "out"
    if out.exists():
        shutil.rmtree(out)
    return runner.invoke(app, ["compile", str(adapter), "--base", str(base), "--target", "merged",
                               "-o", str(out)]), out  # fmt: skip


@FUZZ
@given(
    edits=st.dictionaries(
        st.sampled_from(CONFIG_KEYS) | st.text(max_size=10), json_values, min_size=1, max_size=3
    ),
    drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2),
)
def test_generated_adapter_configs(valid, tmp_path_factory, edits, drop):
    base, adapter = valid
    tmp = tmp_path_factory.mktemp("config")
    bad = Path(shutil.copytree(adapter, tmp / "adapter"))
    config = json.loads((bad / "adapter_config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(edits)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    result, out = compile_into(tmp, bad, base)
    check(result, out)


def _header(data: bytes) -> tuple[int, dict]:
    size = struct.unpack("<Q", data[:8])[0]
    return size, json.loads(data[8 : 8 + size])


@FUZZ
@given(
    mode=st.sampled_from(["bytes", "truncate", "field", "length"]),
    position=st.integers(0, 10_000),
    value=st.integers(0, 255),
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    replacement=json_values,
)
def test_generated_tensor_headers(valid, tmp_path_factory, mode, position, value, field, replacement):
    base, adapter = valid
    tmp = tmp_path_factory.mktemp("header")
    bad = Path(shutil.copytree(adapter, tmp / "adapter"))
    data = bytearray((bad / WEIGHTS).read_bytes())
    size, header = _header(bytes(data))
    if mode == "bytes":  # one byte of the length or the JSON header changed
        data[position % (8 + size)] = value
    elif mode == "truncate":
        data = data[: position % len(data)]
    elif mode == "length":
        data[:8] = struct.pack("<Q", (size + position - 5_000) % (2**64))
    else:  # one tensor's dtype, shape or offsets replaced, the header re-serialised
        name = sorted(k for k in header if k != "__metadata__")[position % (len(header) - 1)]
        header[name][field] = replacement
        text = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(text)) + text + data[8 + size :])
    (bad / WEIGHTS).write_bytes(bytes(data))
    result, out = compile_into(tmp, bad, base)
    check(result, out)


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(BASE_KEYS), json_values, min_size=1, max_size=2))
def test_generated_base_configs(valid, tmp_path_factory, edits):
    base, adapter = valid
    tmp = tmp_path_factory.mktemp("base")
    bad = Path(shutil.copytree(base, tmp / "base"))
    config = json.loads((bad / "config.json").read_text())
    config.update(edits)
    (bad / "config.json").write_text(json.dumps(config))
    result, out = compile_into(tmp, adapter, bad)
    check(result, out)


HUB_EXAMPLES = 60
HUB_KEYS = ["architecture", "mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
            "original_ln_before", "original_ln_after", "residual_before_ln", "ln_before", "ln_after",
            "is_parallel", "scaling", "use_gating", "phm_layer", "leave_out", "inv_adapter", "r", "alpha",
            "attn_matrices", "composition_mode", "selfattn_lora", "init_weights", "shared_W_phm"]  # fmt: skip


@pytest.fixture(scope="module")
def hub_adapter(bases, tmp_path_factory):
    from hub_builders import SeqBnConfig, save_hub

    base = bases("llama")
    return base, save_hub(
        "llama", base, SeqBnConfig(reduction_factor=4), tmp_path_factory.mktemp("hub") / "a"
    )[0]


@settings(FUZZ, max_examples=HUB_EXAMPLES)
@given(
    edits=st.dictionaries(
        st.sampled_from(HUB_KEYS) | st.text(max_size=8), json_values, min_size=1, max_size=3
    )
)
def test_generated_adapterhub_configs(hub_adapter, tmp_path_factory, edits):
    base, adapter = hub_adapter
    tmp = tmp_path_factory.mktemp("hubconfig")
    bad = Path(shutil.copytree(adapter, tmp / "adapter"))
    file = bad / "adapter_config.json"
    saved = json.loads(file.read_text())
    saved["config"] = {**saved["config"], **edits}
    file.write_text(json.dumps(saved))
    result = runner.invoke(
        app, ["compile", str(bad), "--base", str(base), "--target", "hooks", "-o", str(tmp / "out")]
    )
    check(result, tmp / "out")


SHARD_MODES = ["field", "offset", "shape", "dtype", "bytes", "data", "truncate", "index", "index-field"]


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, valid):
    """A llama base in several shards (the `valid` adapter fits it), and its tensors' shapes."""
    from builders import build_base

    base = build_base("llama", tmp_path_factory.mktemp("fuzz-sharded") / "base", shard="20KB")
    return base, _shapes(base)


def _shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor's shape across a checkpoint's safetensors files."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update({k: v["shape"] for k, v in _header(file.read_bytes())[1].items() if k != "__metadata__"})
    return found


def _mutate_shard(data: bytearray, mode: str, position: int, value: int, replacement) -> bytearray:
    """One lie in a safetensors file: a header field, an offset, a dimension, a dtype, a byte, a cut."""
    size, header = _header(bytes(data))
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[names[position % len(names)]]
    if mode == "bytes":
        data[position % (8 + size)] = value
        return data
    if mode == "data":
        data[8 + size + position % max(1, len(data) - 8 - size)] = value
        return data
    if mode == "truncate":
        return data[: position % len(data)]
    delta = value - 128
    if mode == "field":
        entry[["dtype", "shape", "data_offsets"][value % 3]] = replacement
    elif mode == "offset":
        entry["data_offsets"][value % 2] += delta
    elif mode == "shape" and entry["shape"]:
        entry["shape"][value % len(entry["shape"])] += delta if value % 4 else 2**63
    else:
        entry["dtype"] = ["F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "f32", ""][value % 10]
    text = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(text)) + text + data[8 + size :])


def _mutate_index(base: Path, mode: str, position: int, value: int, replacement) -> None:
    """One lie in the index: an entry dropped, added, moved or replaced, or a top-level field replaced."""
    file = base / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    weight_map = index["weight_map"]
    names = sorted(weight_map)
    name = names[position % len(names)]
    shards = sorted(set(weight_map.values()))
    if mode == "index-field":
        index[["weight_map", "metadata", "extra"][value % 3]] = replacement
    elif value % 5 == 0:
        del weight_map[name]
    elif value % 5 == 1:
        weight_map[f"{name}.extra"] = weight_map[name]
    elif value % 5 == 2:
        weight_map[name] = shards[(shards.index(weight_map[name]) + 1) % len(shards)]
    elif value % 5 == 3:
        weight_map[name] = ["../" + weight_map[name], str(base.parent), "/etc/passwd", ""][position % 4]
    else:
        weight_map[name] = replacement
    file.write_text(json.dumps(index))


@FUZZ
@given(
    mode=st.sampled_from(SHARD_MODES),
    shard=st.integers(0, 100),
    position=st.integers(0, 100_000),
    value=st.integers(0, 255),
    replacement=json_values,
)
def test_generated_base_checkpoints(valid, sharded_base, tmp_path_factory, mode, shard, position, value,
                                    replacement):  # fmt: skip
    base, shapes = sharded_base
    tmp = tmp_path_factory.mktemp("checkpoint")
    bad = Path(shutil.copytree(base, tmp / "base"))
    if mode.startswith("index"):
        _mutate_index(bad, mode, position, value, replacement)
    else:
        files = sorted(bad.glob("*.safetensors"))
        file = files[shard % len(files)]
        file.write_bytes(
            bytes(_mutate_shard(bytearray(file.read_bytes()), mode, position, value, replacement))
        )
    result, out = compile_into(tmp, valid[1], bad)
    check(result, out)
    if result.exit_code == 0:  # nothing lost, nothing added: the base's tensors, as the base has them
        assert _shapes(out) == shapes
        for file in bad.glob("*.safetensors"):  # and what was accepted, the safetensors library accepts
            with safe_open(str(file), framework="pt") as handle:
                assert all(handle.get_tensor(name) is not None for name in handle.keys())  # noqa: SIM118
