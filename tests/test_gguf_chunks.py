"""The gguf target rounds each tensor a block of rows at a time: the same bytes, a block's memory."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from builders import make_adapter  # noqa: E402
from gguf_builders import save_tokenizer  # noqa: E402

from adaptrix.api.compile import compile_adapter  # noqa: E402
from adaptrix.targets.gguf import tensors  # noqa: E402

ROW_WISE = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


@pytest.mark.parametrize("quantize", ROW_WISE)
def test_quantizing_row_blocks_gives_the_bytes_of_the_whole_tensor(quantize):
    data = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32) * 3
    qtype = tensors.QTYPES[quantize]
    whole = gguf.quants.quantize(data, qtype)
    blocks = [gguf.quants.quantize(np.ascontiguousarray(data[i : i + 5]), qtype) for i in range(0, 37, 5)]
    assert np.concatenate(blocks).tobytes() == whole.tobytes()


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    base = bases("llama", "gguf-chunks")
    save_tokenizer(base)
    adapter = make_adapter("llama", base, tmp_path_factory.mktemp("chunks") / "adapter")
    return base, adapter


@pytest.mark.parametrize("quantize", ["q8_0", "f16"])
def test_a_tensor_is_rounded_in_blocks_of_rows_with_the_same_bytes(llama, tmp_path, monkeypatch, quantize):
    base, adapter = llama
    compile_adapter(adapter, base, "gguf", tmp_path / "whole", quantize=quantize)
    seen = []
    original = tensors.quantize_rows
    monkeypatch.setattr(tensors, "quantize_rows", lambda d, q: seen.append(d.nbytes) or original(d, q))
    monkeypatch.setattr(tensors, "CHUNK_BYTES", 256)  # a few rows of the tiny model's 64-wide tensors
    compile_adapter(adapter, base, "gguf", tmp_path / "blocks", quantize=quantize)
    assert seen and max(seen) <= 256  # never a whole tensor in float32 at once
    whole, blocks = (
        (tmp_path / "whole" / "model.gguf").read_bytes(),
        (tmp_path / "blocks" / "model.gguf").read_bytes(),
    )
    assert whole == blocks
