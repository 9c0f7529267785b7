"""Round float32 rows to a GGML type with llama.cpp's own C quantizer, where it is installed.

llama-cpp-python ships libggml, whose `ggml_quantize_chunk` is the function `llama-quantize` runs.
The `gguf` package's numpy quantizers are ports of the same reference code: both give the same
bytes (checked once per process on a probe block, and in tests/test_gguf_quantize.py), but the C
one is several times faster and releases the GIL, so blocks of rows are rounded on threads. Without
llama-cpp-python, or when its library fails the probe, the `gguf` package's quantizers are used.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import gguf
import numpy as np

__all__ = ["ggml_library", "map_ordered", "quantize_rows"]

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# The types this target writes; their enum values are part of the GGUF format (stable across builds)
_C_TYPES = frozenset({Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})
_MAX_THREADS = 8
T, R = TypeVar("T"), TypeVar("R")


def quantize_rows(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`rows` (float32, [n, width]) rounded to `qtype`: the bytes `gguf.quants.quantize` gives."""
    lib = ggml_library()
    if lib is None or qtype not in _C_TYPES or rows.ndim != 2:
        return gguf.quants.quantize(rows, qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if rows.shape[1] % block:
        raise ValueError(f"rows of {rows.shape[1]} do not split into {qtype.name} blocks of {block}")
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    _chunk(lib, qtype, rows, out, 0, rows.shape[0])
    return out


def map_ordered(work: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """`work` of each item, computed on the quantizer's threads, a few ahead, yielded in order.

    The C quantizer and torch's kernels release the GIL, so blocks of one tensor round side by side
    while the caller writes the ones before.
    """
    pool, ahead = _pool(), 2 * _threads()
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for job in pending:
            job.cancel()


def _chunk(lib: ctypes.CDLL, qtype, rows: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """Round rows [start, stop) into their rows of `out` (ggml's own bounds: whole rows, from row 0)."""
    count = stop - start
    source, target = rows[start:stop].ctypes.data, out[start:stop].ctypes.data
    written = lib.ggml_quantize_chunk(int(qtype), source, target, 0, count, rows.shape[1], None)
    if written != count * out.shape[1]:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {count} rows of {qtype.name}")


@functools.cache
def _threads() -> int:
    """Threads for one block: the CPUs this process may use, bounded."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_THREADS))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="adaptrix-ggml")


@functools.cache
def ggml_library() -> ctypes.CDLL | None:
    """llama-cpp-python's libggml-base, if installed and its `ggml_quantize_chunk` rounds as `gguf` does."""
    try:
        import llama_cpp  # the package only: its own bindings load libllama, which this does not need
    except ImportError:
        return None
    except OSError as err:  # a broken build: the library fails to load
        logger.warning("llama-cpp-python does not load (%s): rounding with the gguf package", err)
        return None
    folder = Path(llama_cpp.__file__).resolve().parent / "lib"
    names = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
    found = next((folder / name for name in names if (folder / name).is_file()), None)
    if found is None:
        return None
    try:
        lib = ctypes.CDLL(str(found))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    except (OSError, AttributeError) as err:
        logger.warning("%s has no usable ggml_quantize_chunk (%s): rounding with the gguf package",
                       found, err)  # fmt: skip
        return None
    if not _agrees(lib):
        logger.warning("%s rounds differently from the gguf package: rounding with the gguf package", found)
        return None
    return lib


def _agrees(lib: ctypes.CDLL) -> bool:
    """Whether the library gives the gguf package's bytes for every type, on a probe with edge values."""
    probe = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    probe[0, :40] = 0.0  # an all-zero block
    probe[1, 3] = 1e-30  # a subnormal scale
    probe[2, :32] = 7.5  # a constant block
    probe[3] *= 1e4
    for qtype in sorted(_C_TYPES):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        out = np.empty((4, 256 // block * size), dtype=np.uint8)
        _chunk(lib, qtype, probe, out, 0, 4)
        if not np.array_equal(out, gguf.quants.quantize(probe, qtype).view(np.uint8).reshape(out.shape)):
            return False
    return True
