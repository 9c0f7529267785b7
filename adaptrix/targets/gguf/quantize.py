"""Round float32 rows to a GGML type with llama.cpp's own C quantizer, where it is installed.

llama-cpp-python ships libggml, whose `ggml_quantize_chunk` is the function `llama-quantize` runs.
The `gguf` package's numpy quantizers are ports of the same reference code: both give the same
bytes (checked once per process on a probe block, and in tests/test_gguf_quantize.py), but the C
one is several times faster and releases the GIL, so blocks of rows are rounded on threads. Without
llama-cpp-python, or when its library fails the probe, the `gguf` package's quantizers are used.

q8_0, the type most files use, is rounded by torch's vector kernels instead (`_q8_0`): the same
arithmetic as the reference (scale = amax / 127 in float32, x times its reciprocal, `roundf`),
about twice as fast as the reference's scalar C loop, and the same bytes.
"""

from __future__ import annotations

import contextlib
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
import torch

__all__ = ["ggml_library", "map_ordered", "one_torch_thread", "quantize_rows"]

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# The types rounded by llama.cpp's C (q8_0 is torch's: _q8_0); their enum values are part of the GGUF
# format (stable across builds)
_C_TYPES = frozenset({Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})
_MAX_THREADS = 8
T, R = TypeVar("T"), TypeVar("R")
# The largest float32 below 0.5: trunc(q + copysign(_HALF, q)) is C's roundf(q) for every float32 q
# (adding 0.5 itself would round 0.49999997 up); checked on every float32 in [-128, 128].
_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
_Q8_BLOCKS = 4096  # q8_0 blocks rounded at once: a few hundred KB, cache-sized


def quantize_rows(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`rows` (float32, [n, width]) rounded to `qtype`: the bytes `gguf.quants.quantize` gives."""
    lib = ggml_library() if qtype in _C_TYPES else None
    if rows.ndim != 2 or (lib is None and qtype != Q.Q8_0):
        return gguf.quants.quantize(rows, qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if rows.shape[1] % block:
        raise ValueError(f"rows of {rows.shape[1]} do not split into {qtype.name} blocks of {block}")
    if qtype == Q.Q8_0:
        return _q8_0(rows)
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    _chunk(lib, qtype, rows, out, 0, rows.shape[0])
    return out


def _q8_0(rows: np.ndarray) -> np.ndarray:
    """q8_0 blocks of `rows` (float32, contiguous, [n, 32 k]), as `quantize_row_q8_0_ref` writes them.

    Each block of 32: d = max|x| / 127, kept as float16; q = roundf(x * (1 / d)) as int8 (0 where d
    is 0). Rounded a few thousand blocks at a time in reused buffers; torch's kernels release the GIL.
    """
    blocks = torch.from_numpy(rows).reshape(-1, 32)
    out = torch.empty((blocks.shape[0], 34), dtype=torch.uint8)
    step = min(_Q8_BLOCKS, blocks.shape[0])
    work, scale, inverse = torch.empty((step, 32)), torch.empty((step, 1)), torch.empty((step, 1))
    for start in range(0, blocks.shape[0], step):
        x = blocks[start : start + step]
        n = x.shape[0]
        q = torch.abs(x, out=work[:n])
        d = torch.amax(q, 1, keepdim=True, out=scale[:n]).div_(127.0)
        inv = torch.reciprocal(d, out=inverse[:n]).masked_fill_(d == 0, 0.0)
        q.mul_(inv).add_(_HALF).copysign_(x)  # |x| / d + 0.4999..., signed: truncated below
        target = out[start : start + n]
        target[:, :2] = d.half().view(torch.uint8)
        target[:, 2:].view(torch.int8).copy_(q)  # float to int8 truncates toward zero
    return out.view(rows.shape[0], -1).numpy()


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


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch's own kernels on one thread for the block: the target's threads already fill the cores.

    With torch's thread pool too (a merge thread and the rounding threads each starting it), threads
    outnumber cores and spin at its barriers: one 1.1B compile took 6.9 s instead of 5.9 s.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
