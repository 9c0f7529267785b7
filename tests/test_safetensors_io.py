"""The byte-level safetensors code: the streaming writer, the header reader, the sharded checkpoint."""

from __future__ import annotations

import json
import random
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from builders import FAMILIES
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint
from adaptrix.io.safetensors_io import PlannedTensor, read_header, write_safetensors
from adaptrix.ir.errors import BadInputError

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype is torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=generator)
    value = torch.randn(shape, generator=generator) * 100
    if value.numel() > 2:  # special values must survive too, bit for bit
        value.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    return value.to(dtype)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.dtype == expected.dtype and got.shape == expected.shape and _bytes(got) == _bytes(expected)


entry = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),  # () is 0-d; a 0 makes an empty tensor
    st.integers(0, 2**31 - 1),
    st.sampled_from(["write", "copy", "edit"]),  # written; or read from another file, maybe changed
)


def _edit(tensor: torch.Tensor) -> torch.Tensor:
    """An in-place change of any dtype (the edit path's function)."""
    if tensor.dtype == torch.bool:
        return tensor.logical_not_()
    return tensor.neg_() if tensor.dtype.is_floating_point else tensor.add_(1)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(entry, max_size=6), metadata=st.dictionaries(st.text("abc", min_size=1), st.text()))
def test_streaming_writer_round_trips(entries, metadata):
    tensors = {f"t{i}": _tensor(dtype, shape, seed) for i, (dtype, shape, seed, _) in enumerate(entries)}
    how = {f"t{i}": way for i, (*_, way) in enumerate(entries)}
    read = {name for name, way in how.items() if way != "write"}
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "source.safetensors", Path(tmp) / "out.safetensors"
        save_file({name: tensors[name] for name in read}, source)
        infos = read_header(source)[0] if read else {}
        planned = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        done = []
        with write_safetensors(out, planned, metadata) as writer:
            run = []  # consecutive tensors from the source go in one write_each, read ahead
            for name, tensor in tensors.items():
                if name in read:
                    run.append((name, infos[name], _edit if how[name] == "edit" else None))
                    continue
                writer.write_each(run, done.append)
                run = []
                writer.write(name, tensor)
            writer.write_each(run, done.append)
        expected = {name: _edit(t.clone()) if how[name] == "edit" else t for name, t in tensors.items()}
        assert sorted(done) == sorted(infos[name].nbytes for name in read)
        tensors = expected
        with safe_open(str(out), framework="pt") as handle:
            assert set(handle.keys()) == set(tensors)
            assert (handle.metadata() or {}) == metadata
            for name, tensor in tensors.items():
                assert _same(handle.get_tensor(name), tensor), name
        headers, read_metadata = read_header(out)
        assert read_metadata == metadata
        assert [(i.name, i.dtype, i.shape) for i in headers.values()] == [
            (p.name, p.dtype, p.shape) for p in planned
        ]


def test_writer_refuses_what_was_not_planned(tmp_path):
    planned = [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.int64, ())]
    with pytest.raises(ValueError, match="planned"), write_safetensors(tmp_path / "x", planned, {}) as w:
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="planned"), write_safetensors(tmp_path / "y", planned, {}) as w:
        w.write("b", torch.zeros((), dtype=torch.int64))
    with pytest.raises(ValueError, match="1 of 2"), write_safetensors(tmp_path / "z", planned, {}) as w:
        w.write("a", torch.zeros(2))


def _valid_file(path: Path) -> bytes:
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)}, path)
    return path.read_bytes()


def _framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _header(**entries) -> bytes:
    return json.dumps(entries).encode()


def _entry(dtype: str, shape: list[int], offsets: list[int]) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


BAD_FILES = {
    "empty": lambda valid: b"",
    "shorter-than-length": lambda valid: b"\x05\x00\x00",
    "truncated-data": lambda valid: valid[: len(valid) // 2],
    "truncated-header": lambda valid: valid[:20],
    "garbage": lambda valid: random.Random(1).randbytes(len(valid)),
    "header-longer-than-file": lambda valid: struct.pack("<Q", 2**40) + valid[8:],
    "header-not-json": lambda valid: _framed(b"{not json at all"),
    "header-not-utf8": lambda valid: _framed(b"\xff\xfe\xfd\xfc"),
    "header-a-list": lambda valid: _framed(b"[1, 2]"),
    "unknown-dtype": lambda valid: _framed(_header(w=_entry("F8", [1], [0, 1])), b"x"),
    "no-shape": lambda valid: _framed(_header(w={"dtype": "F32", "data_offsets": [0, 4]}), b"xxxx"),
    "size-mismatch": lambda valid: _framed(_header(w=_entry("F32", [2], [0, 4])), b"x" * 8),
    "past-the-end": lambda valid: _framed(_header(w=_entry("F32", [2], [4, 12])), b"x" * 8),
    "negative-offset": lambda valid: _framed(_header(w=_entry("F32", [1], [-4, 0])), b"x" * 8),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_header_rejects_bad_files(case, tmp_path):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(BAD_FILES[case](_valid_file(tmp_path / "valid.safetensors")))
    with pytest.raises(BadInputError) as raised:
        read_header(file)
    assert raised.value.line().startswith(f"{file}: ")


def test_read_header_rejects_a_header_over_the_limit(tmp_path):
    """A length within the file but above 100 MB is refused before anything is read (sparse file)."""
    file = tmp_path / "huge.safetensors"
    with file.open("wb") as handle:
        handle.write(struct.pack("<Q", 150 * 2**20))
        handle.truncate(200 * 2**20)
    with pytest.raises(BadInputError, match="header longer"):
        read_header(file)


def test_read_header_names_a_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="cannot be read"):
        read_header(tmp_path / "absent.safetensors")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def sharded(request, tmp_path_factory):
    """A llama base saved in several shards, and the state dict it was saved from."""
    spec = FAMILIES["llama"]
    torch.manual_seed(0)
    model = spec.model(spec.config(**spec.config_kwargs)).to(request.param)
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="30KB")
    return path, {name: value.detach().clone() for name, value in model.state_dict().items()}, request.param


def test_checkpoint_reads_a_sharded_base_tensor_by_tensor(sharded):
    path, state, dtype = sharded
    checkpoint = Checkpoint(path)
    assert (path / INDEX_NAME).is_file() and len(checkpoint.shards) > 1
    assert set(checkpoint.tensors) == set(state)
    for name, expected in state.items():
        assert _same(checkpoint.read(name), expected), name
        assert checkpoint.info(name).shape == tuple(expected.shape)
    assert checkpoint.dtype() == dtype
    assert checkpoint.binder.name == "llama" and checkpoint.source.num_layers == 2
    assert checkpoint.source.kv_size == 16 and checkpoint.source.hidden_size == 32


def test_checkpoint_refuses_a_missing_shard(sharded, tmp_path):
    path, _, _ = sharded
    copy = tmp_path / "base"
    copy.mkdir()
    shards = sorted(path.glob("model-*.safetensors"))
    for file in path.iterdir():
        if file != shards[-1]:
            (copy / file.name).write_bytes(file.read_bytes())
    with pytest.raises(BadInputError) as raised:
        Checkpoint(copy)
    assert shards[-1].name in raised.value.line() and str(copy / INDEX_NAME) in raised.value.line()
