"""Raw file writes: whole buffers to a descriptor, and byte ranges copied in the kernel."""

from __future__ import annotations

import os
from pathlib import Path

from adaptrix.toolchain.errors import BadInputError

__all__ = ["copy_range", "write_all"]


def write_all(fd: int, data) -> None:
    """Write every byte of a buffer to a file descriptor (unbuffered: big buffers go straight out)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def copy_range(source: Path, fd: int, start: int, length: int) -> None:
    """Append `length` bytes of `source` from `start` to descriptor `fd`, copied in the kernel."""
    with source.open("rb") as src:
        remaining, offset = length, start
        while remaining:
            sent = os.copy_file_range(src.fileno(), fd, remaining, offset)
            if sent == 0:
                raise BadInputError("ended early while copying", path=source)
            remaining -= sent
            offset += sent
