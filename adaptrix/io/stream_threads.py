"""The threads behind HashingWriter (stream.py): one writes pieces, one hashes them, within a budget.

A piece is a staging buffer on its way into the file. The bytes in flight (filled, not yet both
written and hashed) are counted against a budget, so memory stays bounded, and a failure on
either thread is kept to be raised in the caller's thread.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable

import numpy as np

from adaptrix.io import staging

__all__ = ["Piece", "PieceThreads", "StoppedError"]

_DONE = object()


class StoppedError(Exception):
    """The caller stopped a read-ahead."""


class Piece:
    """A buffer on its way into the file.

    Its first `head` bytes are the end of the previous piece, not yet written (a write covers
    whole blocks); the next `length` are new and hashed; its first `written` bytes are written at
    `offset`, a block boundary, and what follows them starts the next piece.
    """

    __slots__ = ("buffer", "head", "length", "offset", "pending", "written")

    def __init__(self, buffer: np.ndarray, head: int, length: int, offset: int):
        self.buffer, self.head, self.length, self.offset = buffer, head, length, offset
        self.written = 0
        self.pending = 2  # the hash and the write


class PieceThreads:
    """The budget of bytes in flight, and the threads that hash pieces and write them into `_fd`.

    The subclass opens the file (`_fd`, `_direct`: written with direct I/O), calls
    `_start_threads`, sends each piece to `_hashes` and `_writes`, and `_stop_threads` at the end.
    """

    def __init__(self, budget: int):
        self._budget = budget
        self._in_flight = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._digest = hashlib.sha256()
        self._fd, self._direct = -1, False

    def _start_threads(self) -> None:
        """Start the hashing and the writing thread."""
        self._hashes, self._writes = queue.SimpleQueue(), queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, args=args, name=f"adaptrix-{name}", daemon=True)
            for args, name in (((self._hashes, self._hash), "sha256"), ((self._writes, self._write), "write"))
        ]
        for thread in self._threads:
            thread.start()

    def _stop_threads(self) -> None:
        """Let both threads finish what was sent to them, and wait for them."""
        for target in (self._hashes, self._writes):
            target.put(_DONE)
        for thread in self._threads:
            thread.join()

    def _hold(self, length: int, stop: threading.Event | None = None) -> None:
        """Wait until `length` more bytes may be in flight, and count them."""
        with self._room:
            while self._in_flight and self._in_flight + length > self._budget and self._error is None:
                if stop is not None and stop.is_set():
                    raise StoppedError
                self._room.wait()
            if self._error is not None:
                raise self._error
            self._in_flight += length

    # the threads' side

    def _run(self, items: queue.SimpleQueue, work: Callable[[Piece], None]) -> None:
        while (piece := items.get()) is not _DONE:
            if self._error is None:
                try:
                    work(piece)
                except BaseException as exc:
                    with self._room:
                        self._error = self._error or exc
                        self._room.notify_all()
            self._release(piece)

    def _release(self, piece: Piece) -> None:
        """One of the piece's jobs is done; after the last its buffer and budget are given back."""
        with self._room:
            piece.pending -= 1
            if piece.pending:
                return
            self._in_flight -= piece.length
            self._room.notify_all()
        staging.POOL.give(piece.buffer)

    def _hash(self, piece: Piece) -> None:
        self._digest.update(piece.buffer[piece.head : piece.head + piece.length])

    def _write(self, piece: Piece) -> None:
        view, offset = memoryview(piece.buffer[: piece.written]), piece.offset
        while view:
            try:
                done = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if not self._direct:
                    raise
                staging.direct_refused(self._fd, exc)
                self._direct = False
                continue
            view, offset = view[done:], offset + done
