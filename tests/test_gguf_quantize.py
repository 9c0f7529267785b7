"""The gguf target rounds as llama.cpp does (its C quantizer; torch for q8_0): the gguf package's bytes."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from adaptrix.targets.gguf import quantize  # noqa: E402
from adaptrix.targets.gguf.tensors import QTYPES  # noqa: E402

ROW_WISE = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def _rows() -> np.ndarray:
    """Rows with the edge cases of block rounding: zeros, subnormals, ties, huge and constant blocks."""
    data = np.random.default_rng(3).standard_normal((300, 256)).astype(np.float32)
    data[0] = 0.0
    data[1, :32] = 1e-40  # subnormal
    data[2, :32] = np.arange(32) - 15.5  # halves: ties of the rounding
    data[3] *= 6e4  # near float16's largest
    data[4, :64] = 2.5
    data[5] = np.linspace(-1, 1, 256) * 127  # exact multiples of the block scale
    # q8_0's scale is 1 where a block's largest is 127: these are rounded as they are, so every tie
    # n + 0.5 and its float32 neighbours meet roundf (0.49999997 is where adding 0.5 would round up)
    below, above = np.float32(0.5) - np.float32(2.0**-25), np.nextafter(np.float32(2.5), np.float32(3))
    edges = [127, below, 0.5, 1.5, 2.5, 126.5, np.nextafter(np.float32(2.5), np.float32(0)), above, 0.25]
    for row, sign in ((6, 1), (7, -1)):
        data[row, :32] = np.resize(np.float32(sign) * np.array(edges, np.float32), 32)
        data[row, 32:64] = np.float32(sign) * (np.arange(32, dtype=np.float32) * 4 + 0.5)  # 124.5 largest
    return data


@pytest.mark.skipif(quantize.ggml_library() is None, reason="llama-cpp-python's libggml is not installed")
@pytest.mark.parametrize("kind", ROW_WISE)
def test_llama_cpps_c_quantizer_gives_the_gguf_packages_bytes(kind):
    data, qtype = _rows(), QTYPES[kind]
    assert quantize.quantize_rows(data, qtype).tobytes() == gguf.quants.quantize(data, qtype).tobytes()


@pytest.mark.parametrize("kind", ROW_WISE)
def test_without_the_c_library_the_gguf_package_rounds(kind, monkeypatch):
    monkeypatch.setattr(quantize, "ggml_library", lambda: None)
    data, qtype = _rows(), QTYPES[kind]
    assert quantize.quantize_rows(data, qtype).tobytes() == gguf.quants.quantize(data, qtype).tobytes()


def test_rows_that_do_not_fill_blocks_are_refused():
    if quantize.ggml_library() is None:
        pytest.skip("llama-cpp-python's libggml is not installed")
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize.quantize_rows(np.zeros((2, 48), np.float32), QTYPES["q8_0"])


def test_blocks_rounded_on_threads_come_back_in_order():
    assert list(quantize.map_ordered(lambda x: x * x, range(50))) == [x * x for x in range(50)]


def test_a_failure_on_a_thread_is_raised_in_order():
    def work(x):
        if x == 7:
            raise RuntimeError("block 7")
        return x

    seen = []
    with pytest.raises(RuntimeError, match="block 7"):
        seen.extend(quantize.map_ordered(work, range(20)))
    assert seen == list(range(7))


def test_torch_runs_on_one_thread_while_the_target_writes_and_is_given_back_after():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with quantize.one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
