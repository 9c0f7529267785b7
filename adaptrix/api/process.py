"""What a compile sets up in its process: OpenMP's wait policy, and hashing the base's files early.

Standard library only, so that the CLI can call it before torch loads. Library callers get the
same: importing adaptrix.api sets the wait policy, and compile_adapter starts the hashing.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["passive_openmp", "prepare_compile"]


def passive_openmp() -> None:
    """Keep torch's OpenMP workers from spinning between parallel regions (unless the user chose).

    They otherwise take the cores from the threads that read, hash and write: 4 s of CPU in a
    1.1B merge on 2 cores. It acts only where torch has not loaded yet.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def prepare_compile(base: Path | str) -> None:
    """Before a compile's heavy imports: the wait policy, and the base's files hashing on a thread."""
    passive_openmp()
    base = Path(base)
    if base.is_dir():
        from adaptrix.io.hashing import hash_early  # numpy: not at start-up of every command

        hash_early(sorted(p for p in base.iterdir() if p.is_file()))
