"""A file of known size filled in order through memory maps, hashed on a thread as it fills.

Large artifacts are disk-bound. On the 2-core machines we measured, copying bytes into a
memory-mapped, preallocated file ran about twice as fast as os.write into a new one, and a kernel
copy_file_range faster still. So `HashingWriter` preallocates the file (a full disk fails here,
with a clear error, not as a SIGBUS later) and hands the caller a writable map of each piece's
bytes to compute into, optionally holding another file's bytes first, copied in the kernel: a
merge adds its delta to the base's bytes in place.
Ranges of another file are copied in the kernel on one thread; the sha256 of each piece is taken
on another once it is complete, and its map is dropped then, so the mapped bytes stay bounded.
The digest is of the bytes written, so the manifest does not have to read the file again.
Where the file system cannot map files, a piece is computed into memory and written with pwrite.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adaptrix.toolchain.errors import AdaptrixError, BadInputError

__all__ = ["HashingWriter", "OutputSpaceError", "read_range"]

_DONE = object()
_GRANULE = mmap.ALLOCATIONGRANULARITY


class OutputSpaceError(AdaptrixError):
    """The output's file system cannot hold the file."""


class _Piece:
    __slots__ = ("held", "length", "mapped", "source", "start", "view", "zeros")

    def __init__(self, length, view=None, mapped=None, source=None, start=0, zeros=False):
        self.length, self.view, self.mapped = length, view, mapped
        self.source, self.start, self.zeros = source, start, zeros
        self.held = length if view is not None else 0  # bytes counted against the budget


class HashingWriter:
    """Fill the new file `path` of `size` bytes in order; `close()` returns its sha256.

    At most `budget` bytes are mapped and not yet hashed (one piece always may be), so memory stays
    bounded. A failure on either thread is raised by the next call in the caller's thread.
    """

    def __init__(self, path: Path, size: int, budget: int = 64 << 20):
        self.path, self.size = Path(path), size
        self.offset = 0
        self._budget = budget
        self._in_flight = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._digest = hashlib.sha256()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _reserve(self._fd, size)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputSpaceError(f"no room for {size / 1e9:.2f} GB", path=self.path,
                                       fix="free space there or choose another -o") from None  # fmt: skip
            raise
        self._hashes, self._copies = queue.SimpleQueue(), queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, args=args, name=f"adaptrix-{name}", daemon=True)
            for args, name in (((self._hashes, self._hash), "sha256"), ((self._copies, self._copy), "copy"))
        ]
        for thread in self._threads:
            thread.start()

    def fill(
        self, length: int, compute: Callable[[np.ndarray], None], source: tuple[Path, int] | None = None
    ) -> None:
        """Append `length` bytes that `compute` writes into the uint8 view it is given.

        With `source` (a file and an offset), the view holds that file's bytes from there first,
        copied in the kernel, and `compute` changes them in place.
        """
        self._admit(length, mapped=length)
        if not length:
            return
        if source is not None:
            _copy_range(Path(source[0]), source[1], length, self._fd, self.offset)
        start = self.offset - self.offset % _GRANULE
        try:
            mapped = mmap.mmap(self._fd, self.offset + length - start, offset=start)
            view = np.frombuffer(mapped, np.uint8, length, self.offset - start)
        except OSError:  # a file system that cannot map files: compute into memory, then write
            mapped, view = None, np.empty(length, np.uint8)
            if source is not None:
                read_range(self._fd, view, self.offset, self.path)
        piece = _Piece(length, view, mapped)
        try:
            compute(view)
            if mapped is None:
                _pwrite_all(self._fd, view, self.offset)
        except BaseException:
            del view
            self._release(piece)  # the digest is never returned after a failure
            raise
        self.offset += length
        self._hashes.put(piece)

    def put(self, data) -> None:
        """Append a buffer's bytes."""
        source = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        self.fill(source.nbytes, lambda view: np.copyto(view, source))

    def skip(self, length: int) -> None:
        """Append `length` zero bytes (the preallocated file reads as zeros)."""
        self._admit(length)
        self.offset += length
        self._hashes.put(_Piece(length, zeros=True))

    def copy(self, source: Path, start: int, length: int) -> None:
        """Append `length` bytes of `source` from `start`, copied in the kernel."""
        self._admit(length)
        piece = _Piece(length, source=Path(source), start=start)
        self._copies.put((piece, self.offset))
        self._hashes.put(piece)
        self.offset += length

    def close(self) -> str:
        """Wait until everything is copied and hashed; return the sha256 hex digest."""
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

    def _admit(self, length: int, mapped: int = 0) -> None:
        """Check that `length` more bytes fit; wait until `mapped` more may be mapped."""
        if self.offset + length > self.size:
            raise ValueError(f"{self.path}: {self.offset + length} bytes exceed its size {self.size}")
        with self._room:
            while self._in_flight and self._in_flight + mapped > self._budget and self._error is None:
                self._room.wait()
            if self._error is not None:
                raise self._error
            self._in_flight += mapped

    def _finish(self) -> None:
        if self._fd < 0:
            return
        for target in (self._hashes, self._copies):
            target.put(_DONE)
        for thread in self._threads:
            thread.join()
        os.close(self._fd)
        self._fd = -1

    # the threads' side

    def _run(self, items: queue.SimpleQueue, work: Callable) -> None:
        while (item := items.get()) is not _DONE:
            if self._error is None:
                try:
                    work(item)
                except BaseException as exc:
                    with self._room:
                        self._error = self._error or exc
                        self._room.notify_all()
            if isinstance(item, _Piece):
                self._release(item)

    def _release(self, piece: _Piece) -> None:
        """Drop a hashed piece's view and map, and give its bytes back to the budget."""
        piece.view = None
        if piece.mapped is not None:
            with contextlib.suppress(BufferError):  # a caller kept a view: the map goes with it
                piece.mapped.close()
            piece.mapped = None
        if piece.held:
            with self._room:
                self._in_flight -= piece.held
                self._room.notify_all()
            piece.held = 0

    def _hash(self, piece: _Piece) -> None:
        if piece.zeros:
            for done in range(0, piece.length, 1 << 20):
                self._digest.update(bytes(min(1 << 20, piece.length - done)))
        elif piece.view is not None:
            self._digest.update(piece.view)
        elif piece.length:  # read in small pieces: a map of the source would count as our memory
            buffer = np.empty(min(piece.length, 1 << 20), np.uint8)
            with piece.source.open("rb") as handle:
                for done in range(0, piece.length, buffer.nbytes):
                    view = buffer[: min(buffer.nbytes, piece.length - done)]
                    read_range(handle.fileno(), view, piece.start + done, piece.source)
                    self._digest.update(view)

    def _copy(self, job: tuple[_Piece, int]) -> None:
        piece, offset = job
        _copy_range(piece.source, piece.start, piece.length, self._fd, offset)


def _reserve(fd: int, size: int) -> None:
    """Give the file its size with its blocks allocated, where the file system can."""
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # no preallocation here (ZFS, some network file systems)


def _copy_range(source: Path, start: int, length: int, fd: int, offset: int) -> None:
    """Copy `length` bytes of `source` from `start` to `fd` at `offset`, in the kernel."""
    with source.open("rb") as src:
        done = 0
        while done < length:
            sent = os.copy_file_range(src.fileno(), fd, length - done, start + done, offset + done)
            if sent == 0:
                raise BadInputError("ended early while copying", path=source)
            done += sent


def read_range(fd: int, out: np.ndarray, offset: int, path: Path) -> None:
    """Fill `out` with the bytes of `fd` from `offset`."""
    view = memoryview(out).cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise BadInputError("ended early while reading", path=path)
        view, offset = view[got:], offset + got


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
