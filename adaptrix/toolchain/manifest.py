"""manifest.json: what an artifact was built from and how, so it can be checked later."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adaptrix import __version__

__all__ = ["MANIFEST_NAME", "InputHashes", "write_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class InputHashes:
    """Hashes input files on a background thread while the compile runs (hashlib frees the GIL)."""

    def __init__(self, groups: dict[str, tuple[Path, Sequence[Path]]]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptrix-sha256")
        self._groups = {
            label: (root, {f.name: self._pool.submit(sha256_file, f) for f in files})
            for label, (root, files) in groups.items()
        }

    def result(self) -> dict[str, dict]:
        """Wait for every hash: {label: {path, files: {name: sha256}}}."""
        try:
            return {
                label: {
                    "path": str(root),
                    "files": {n: f.result() for n, f in sorted(futures.items())},
                }
                for label, (root, futures) in self._groups.items()
            }
        finally:
            self._pool.shutdown()

    def cancel(self) -> None:
        """Stop hashing (the compile failed)."""
        self._pool.shutdown(cancel_futures=True)


def write_manifest(
    out: Path, *, target: str, dtype: str, inputs: dict, passes: list, files: list[str], extra: dict
) -> None:
    """Write manifest.json into an output directory."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "adaptrix_version": __version__,
        "target": target,
        "dtype": dtype,
        "inputs": inputs,
        "passes": passes,
        "files": sorted(files),
        **extra,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
