"""A file of known size filled in order through reused staging buffers, written and hashed on threads.

Large artifacts are disk-bound, and what costs there is the first touch of new pages and the
copies between them. Writing through a memory map of a preallocated file makes the kernel zero
every page before it is filled, and a fresh array per tensor is zeroed again on first touch. So
every piece goes through a small pool of staging buffers that stay allocated: the caller reads,
copies or computes into one (a merge reads the base's bytes into it and adds its delta there, in
place), one thread writes it with direct I/O (the disk reads the buffer itself: no page-cache
copy, no writeback later), another hashes it, and the buffer goes back to the pool when both are
done. A 1.1B merge on 2 cores went from 8-10 s to 4 s. Direct I/O writes whole aligned blocks,
so the bytes past a piece's last block start the next piece's buffer, and the file is cut back
to its size at the end; where the file system refuses direct I/O, writes go through the page cache.
The file is preallocated first, so a full disk fails here with a clear error and not midway.
The digest is of the bytes written, so the manifest does not have to read the file again.
The pieces, their budget and the two threads are in stream_threads.py.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from adaptrix.io import staging
from adaptrix.io.staging import read_range
from adaptrix.io.stream_threads import Piece, PieceThreads, StoppedError
from adaptrix.ir.errors import AdaptrixError

__all__ = ["HashingWriter", "OutputSpaceError", "read_range"]

Compute = Callable[[np.ndarray], None]
_CHUNK = 8 << 20  # put, copy and skip go through buffers of at most this many bytes
_AHEAD = 32 << 20  # a source's bytes after those read are read into the page cache meanwhile


class OutputSpaceError(AdaptrixError):
    """The output's file system cannot hold the file."""


class HashingWriter(PieceThreads):
    """Fill the new file `path` of `size` bytes in order; `close()` returns its sha256.

    At most `budget` bytes are in flight (filled, not yet both written and hashed; one piece
    always may be), so memory stays bounded. A failure on either thread is raised by the next
    call in the caller's thread. The file is written with direct I/O where the file system
    allows it (no page-cache copy, no writeback later), else through the page cache.
    """

    def __init__(self, path: Path, size: int, budget: int = 64 << 20):
        self.path, self.size = Path(path), size
        self.offset = 0
        super().__init__(budget)
        self._sources: dict[Path, tuple[int, bool]] = {}  # files read from, kept open; direct or not
        self._tail = b""  # the bytes after the last whole block, which start the next piece
        self._fd, self._direct = staging.open_output(self.path)
        try:
            staging.reserve(self._fd, size)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputSpaceError(f"no room for {size / 1e9:.2f} GB", path=self.path,
                                       fix="free space there or choose another -o") from None  # fmt: skip
            raise
        self._start_threads()

    def fill(self, length: int, compute: Compute, source: tuple[Path, int] | None = None) -> None:
        """Append `length` bytes that `compute` writes into the uint8 view it is given.

        With `source` (a file and an offset), the view holds that file's bytes from there first,
        and `compute` changes them in place.
        """
        self._check_room(length)
        if length:
            self._complete(self._prepare(length, source, self.offset), compute)

    def fill_each(self, jobs: Sequence[tuple[int, Compute | None, tuple[Path, int] | None]]) -> None:
        """`fill` each (length, compute or None, source) in order, the sources read ahead on a thread.

        While the caller computes one piece, the next ones' bytes are read, within the budget.
        """
        jobs = [(n, _zeros if f is None and s is None else f, s) for n, f, s in jobs if n]  # no source: zeros
        self._check_room(sum(job[0] for job in jobs))
        ready: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        reader = threading.Thread(target=self._read_ahead, args=(jobs, ready, stop), name="adaptrix-read")
        reader.start()
        try:
            for _, compute, _ in jobs:
                if isinstance(piece := ready.get(), BaseException):
                    raise piece
                self._complete(piece, compute)
        finally:
            with self._room:
                stop.set()
                self._room.notify_all()
            reader.join()
            while not ready.empty():
                if isinstance(piece := ready.get(), Piece):
                    piece.pending = 1
                    self._release(piece)

    def put(self, data) -> None:
        """Append a buffer's bytes."""
        source = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        for done in range(0, source.nbytes, _CHUNK):
            part = source[done : done + _CHUNK]
            self.fill(part.nbytes, lambda view, part=part: np.copyto(view, part))

    def skip(self, length: int) -> None:
        """Append `length` zero bytes."""
        for done in range(0, length, _CHUNK):
            self.fill(min(_CHUNK, length - done), _zeros)

    def copy(self, source: Path, start: int, length: int) -> None:
        """Append `length` bytes of `source` from `start`."""
        for done in range(0, length, _CHUNK):
            part = min(_CHUNK, length - done)
            self.fill(part, lambda view: None, source=(source, start + done))

    def close(self) -> str:
        """Wait until everything is written and hashed; return the sha256 hex digest."""
        if self._tail and self._error is None and self.offset == self.size:
            self._write_tail()
        self._finish()
        if self._error is not None:
            raise self._error
        if self.offset != self.size:
            raise ValueError(f"{self.path}: {self.offset} bytes written of {self.size}")
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Stop after what is in flight, without raising (the caller is already failing)."""
        self._finish()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is not None:
            self.abort()
        elif self._fd >= 0:
            self.close()

    # the caller's side

    def _check_room(self, length: int) -> None:
        if self.offset + length > self.size:
            raise ValueError(f"{self.path}: {self.offset + length} bytes exceed its size {self.size}")

    def _prepare(self, length: int, source: tuple[Path, int] | None, offset: int, stop=None) -> Piece:
        """A piece for the bytes at `offset`, within the budget, holding the source's bytes."""
        self._hold(length, stop)
        head = offset % staging.BLOCK  # the bytes of the last block begun, not written yet
        piece = Piece(staging.POOL.take(head + length), head, length, offset - head)
        if source is not None:
            try:
                self._read(Path(source[0]), source[1], piece.buffer[head : head + length])
            except BaseException:
                piece.pending = 1
                self._release(piece)
                raise
        return piece

    def _complete(self, piece: Piece, compute: Compute | None) -> None:
        """Let `compute` change the piece's bytes, then send it to be hashed and written."""
        head, length = piece.head, piece.length
        try:
            if compute is not None:
                compute(piece.buffer[head : head + length])
        except BaseException:
            piece.pending = 1
            self._release(piece)  # the digest is never returned after a failure
            raise
        piece.buffer[:head] = np.frombuffer(self._tail, np.uint8)
        end = head + length
        piece.written = end - end % staging.BLOCK
        self._tail = piece.buffer[piece.written : end].tobytes()
        self.offset += length
        self._hashes.put(piece)
        self._writes.put(piece)

    def _read_ahead(self, jobs: list, ready: queue.SimpleQueue, stop: threading.Event) -> None:
        offset = self.offset
        for length, _, source in jobs:
            if stop.is_set():
                return
            try:
                ready.put(self._prepare(length, source, offset, stop))
            except StoppedError:
                return
            except BaseException as exc:
                ready.put(exc)
                return
            offset += length

    def _read(self, source: Path, start: int, view: np.ndarray) -> None:
        """Read a source's bytes into `view`: direct where allowed, else cached and read ahead."""
        if (opened := self._sources.get(source)) is None:
            opened = self._sources[source] = staging.open_input(source)
        fd, direct = opened
        if direct:
            try:
                return staging.read_direct(fd, view, start, source)
            except OSError as exc:
                staging.direct_refused(fd, exc)
                self._sources[source] = (fd, False)
        staging.read_range(fd, view, start, source)
        os.posix_fadvise(fd, start + view.nbytes, _AHEAD, os.POSIX_FADV_WILLNEED)

    def _write_tail(self) -> None:
        """Write the last bytes as a whole block (the file is cut back to its size after)."""
        piece = Piece(staging.POOL.take(staging.BLOCK), len(self._tail), 0, self.offset - len(self._tail))
        piece.buffer[: staging.BLOCK] = 0
        piece.buffer[: piece.head] = np.frombuffer(self._tail, np.uint8)
        piece.written, piece.pending = staging.BLOCK, 1
        self._writes.put(piece)

    def _finish(self) -> None:
        for fd, _ in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self._fd < 0:
            return
        self._stop_threads()
        os.ftruncate(self._fd, self.size)  # a last whole block may have run past it
        os.close(self._fd)
        self._fd = -1


def _zeros(view: np.ndarray) -> None:
    view.fill(0)
