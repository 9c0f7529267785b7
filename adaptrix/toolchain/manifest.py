"""manifest.json: what an artifact was built from and how, so it can be checked later."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from adaptrix import __version__
from adaptrix.toolchain.hashing import hash_files

__all__ = ["MANIFEST_NAME", "input_hashes", "output_hashes", "write_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def input_hashes(groups: dict[str, tuple[Path, Sequence[Path]]]) -> dict[str, dict]:
    """sha256 of every input file: {label: {path, files: {name: sha256}}}."""
    digests = hash_files([f for _, files in groups.values() for f in files])
    return {
        label: {"path": str(root), "files": {f.name: digests[f] for f in sorted(files)}}
        for label, (root, files) in groups.items()
    }


def output_hashes(out: Path, files: Sequence[str], known: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Size and sha256 of every file an artifact holds besides its manifest, for `adaptrix verify`.

    `known`: digests of files hashed as they were written (by name); the others are read here.
    """
    known = known or {}
    names = [name for name in files if name != MANIFEST_NAME]
    digests = {out / name: known[name] for name in names if name in known}
    digests.update(hash_files([out / name for name in names if name not in known]))
    paths = [out / name for name in names]
    return {str(path.relative_to(out)): {"bytes": path.stat().st_size, "sha256": digests[path]}
            for path in paths}  # fmt: skip


def write_manifest(
    out: Path,
    *,
    target: str,
    dtype: str,
    inputs: dict,
    passes: list,
    files: list[str],
    extra: dict,
    known: Mapping[str, str] | None = None,
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
        "outputs": output_hashes(out, files, known),
        **extra,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
