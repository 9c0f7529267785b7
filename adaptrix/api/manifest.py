"""manifest.json: what an artifact was built from and how, so it can be checked later."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import NoReturn

from adaptrix.artifacts import ADAPTRIX_VERSION, MANIFEST_NAME
from adaptrix.io.hashing import hash_files
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

__all__ = ["MANIFEST_NAME", "check_manifest", "input_hashes", "is_sha256", "output_hashes",
           "read_artifact_manifest", "write_manifest"]  # fmt: skip

MANIFEST_FORMAT = 1


def input_hashes(groups: dict[str, tuple[Path, Sequence[Path]]]) -> dict[str, dict]:
    """sha256 of every input file: {label: {path, files: {name: sha256}}}.

    Paths are recorded resolved (links and `..` followed), so that the manifest does not depend
    on how an input was spelled; an input file given through a link is named as its target.
    """
    digests = hash_files([f for _, files in groups.values() for f in files])
    recorded = {}
    for label, (root, files) in groups.items():
        real = Path(os.path.realpath(root))
        names = {(real.name if real.is_file() else f.name): digests[f] for f in files}
        recorded[label] = {"path": str(real), "files": dict(sorted(names.items()))}
    return recorded


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
        "adaptrix_version": ADAPTRIX_VERSION,
        "target": target,
        "dtype": dtype,
        "inputs": inputs,
        "passes": passes,
        "files": sorted(files),
        "outputs": output_hashes(out, files, known),
        **extra,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-create the artifact with `adaptrix compile`: a manifest is written by it, never by hand"


def read_artifact_manifest(path: Path, fix: str) -> dict:
    """The manifest.json of the artifact at `path`, a JSON object; else refused (exit 2) with `fix`."""
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        raise BadInputError("has no manifest.json", path=path, fix=fix)
    manifest = read_json(manifest_file, what="manifest")
    if not isinstance(manifest, dict):
        raise BadInputError("is not an Adaptrix manifest (not a JSON object)", path=manifest_file)
    return manifest


def is_sha256(value: object) -> bool:
    """Whether `value` is a sha256 as manifests spell it: 64 lower-case hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def check_manifest(manifest: object, path: Path) -> None:
    """Refuse a manifest that lacks a section verify relies on, or names a path outside the artifact."""
    if not isinstance(manifest, dict):
        _incomplete("it is not a JSON object", path)
    if not isinstance(manifest.get("target"), str) or not manifest["target"]:
        _incomplete("its target is not a name", path)
    files, outputs = manifest.get("files"), manifest.get("outputs")
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        _incomplete("its files section is not a list of names", path)
    if not isinstance(outputs, dict) or not outputs:
        _incomplete("it has no outputs section (name -> bytes, sha256)", path)
    for name, entry in outputs.items():
        _check_name(name, path)
        if not isinstance(entry, dict) or type(entry.get("bytes")) is not int or entry["bytes"] < 0:
            _incomplete(f"outputs {name!r}: bytes is not a count of bytes", path)
        if not is_sha256(entry.get("sha256")):
            _incomplete(f"outputs {name!r}: sha256 is not 64 hex digits", path)
    if set(files) - {MANIFEST_NAME} != set(outputs):
        _incomplete("its files and outputs sections list different files", path)
    _check_inputs(manifest.get("inputs"), path)
    if "onnx" in manifest:
        _check_onnx(manifest["onnx"], path)


def _check_inputs(inputs: object, path: Path) -> None:
    if not isinstance(inputs, dict) or not inputs:
        _incomplete("it has no inputs section (label -> path, files)", path)
    for label, group in inputs.items():
        if not isinstance(group, dict) or not isinstance(group.get("path"), str):
            _incomplete(f"inputs {label!r}: path is not text", path)
        digests = group.get("files")
        if not isinstance(digests, dict) or not all(is_sha256(value) for value in digests.values()):
            _incomplete(f"inputs {label!r}: files is not name -> sha256", path)
        for name in digests:
            if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
                _incomplete(f"inputs {label!r} names {name!r}, not a file name", path)


def _check_onnx(section: object, path: Path) -> None:
    if not isinstance(section, dict):
        _incomplete("its onnx section is not an object", path)
    for kind in ("inputs", "outputs"):
        names = section.get(kind)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            _incomplete(f"onnx {kind} is not a list of names", path)
    lora = section.get("lora", {})
    if not isinstance(lora, dict) or not isinstance(lora.get("inputs", {}), dict):
        _incomplete("onnx lora inputs is not an object", path)


def _check_name(name: str, path: Path) -> None:
    """A name an artifact holds: relative, plain (no `.`, `..`, `//`), so it lies inside the artifact."""
    parts = PurePosixPath(name).parts
    plain = name and "\0" not in name and "\\" not in name and "/".join(parts) == name
    if not plain or PurePosixPath(name).is_absolute() or any(part in (".", "..") for part in parts):
        raise BadInputError(f"names {name!r}, not a plain path inside the artifact: never followed",
                            path=path, fix=_FIX)  # fmt: skip


def _incomplete(detail: str, path: Path) -> NoReturn:
    raise BadInputError(f"is not a complete Adaptrix manifest: {detail}", path=path, fix=_FIX)
