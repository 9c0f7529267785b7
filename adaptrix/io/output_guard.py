"""What an output may be: never an input, never a folder or file Adaptrix did not write.

Paths are compared as the operating system resolves them (symlinks, `..`), never as spelled:
`-o x/../BASE` is the base, and `--base LINK` is the folder the link points to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adaptrix.artifacts import AIR_FORMAT
from adaptrix.artifacts import MANIFEST_NAME as _MANIFEST
from adaptrix.io.jsonfile import MAX_JSON_BYTES, loads_strict, read_json
from adaptrix.ir.errors import BadInputError

__all__ = ["check_output", "check_outside_inputs", "resolved"]

_KEEP = "remove it yourself if it may go, or choose another -o"


def resolved(path: Path | str) -> Path:
    """`path` as the operating system finds it: absolute, symlinks and `..` resolved."""
    return Path(os.path.realpath(path))


def check_output(
    out: Path | str, *, force: bool, inputs: Sequence[Path | str] = (), kind: str = "directory"
) -> Path:
    """The resolved output path, once it is known to touch no input and to replace only what it may."""
    given = Path(out).absolute()
    if os.path.islink(given) and not os.path.exists(given):
        raise BadInputError(f"is a symbolic link to {os.readlink(given)}, which does not exist", path=given,
                            fix="remove the link, or give -o the path to write")  # fmt: skip
    target = resolved(given)
    if target.parent == target:
        raise BadInputError("is the root of the file system", path=given, fix="choose another -o")
    check_outside_inputs(target, inputs, f"an output {kind}", given=given)
    check_replaceable(target, force=force, kind=kind, given=given)
    return target


def check_outside_inputs(
    folder: Path | str,
    inputs: Sequence[Path | str],
    what: str,
    *,
    given: Path | None = None,
    replaced: bool = True,
) -> None:
    """Refuse a place to write that is, lies inside, or (if it is `replaced`) holds any input."""
    target = resolved(folder)
    shown = given or Path(folder).absolute()
    for each in inputs:
        source = resolved(each)
        if target == source or _same_file(target, source) or (replaced and source.is_relative_to(target)):
            why = f"would overwrite the input {each}"
        elif target.is_relative_to(source):
            why = f"lies inside the input {each}"
        else:
            continue
        if target != shown:
            why += f" (it resolves to {target})"
        raise BadInputError(why, path=shown, fix=f"choose {what} outside every input")


def check_replaceable(target: Path, *, force: bool, kind: str, given: Path) -> None:
    """Refuse an existing output without --force, and one that --force may not replace."""
    if not os.path.lexists(target):
        return
    if kind == "directory" and not target.is_dir():
        raise BadInputError("exists and is not a directory", path=given, fix="choose another -o")
    if kind == "file" and target.is_dir():
        raise BadInputError("is a directory", path=given, fix="give -o the name of the file to write")
    reason = _not_adaptrix_folder(target) if kind == "directory" else _not_air_file(target)
    if reason is None and not force:
        raise BadInputError("already exists", path=given, fix="pass --force to replace it")
    if reason is not None:
        what = (
            "an empty folder or an Adaptrix output" if kind == "directory" else "an AIR file Adaptrix wrote"
        )
        raise BadInputError(f"already exists and {reason}: --force replaces only {what}",
                            path=given, fix=_KEEP)  # fmt: skip


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _not_adaptrix_folder(folder: Path) -> str | None:
    """Why `folder` is neither empty nor an Adaptrix artifact; None when it is one of those."""
    try:
        if not os.listdir(folder):
            return None
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return f"is not an Adaptrix output (it holds no {_MANIFEST})"
    try:
        record = read_json(manifest, what="manifest")
    except BadInputError:
        return f"is not an Adaptrix output (its {_MANIFEST} is not valid JSON)"
    fields = ("adaptrix_version", "target")
    if not (isinstance(record, dict) and all(isinstance(record.get(f), str) for f in fields)):
        return f"is not an Adaptrix output (its {_MANIFEST} names no adaptrix_version and target)"
    return None


def _not_air_file(file: Path) -> str | None:
    """Why `file` is not an AIR file (a safetensors file whose metadata says adaptrix-air); None if it is."""
    try:
        with file.open("rb") as handle:
            head = handle.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            text = handle.read(size) if 0 < size <= MAX_JSON_BYTES else b""
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    try:
        header = loads_strict(text, path=file, what="safetensors header") if text else None
    except BadInputError:
        header = None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not (isinstance(metadata, dict) and metadata.get("format") == AIR_FORMAT):
        return f"is not an AIR file (no safetensors header whose metadata says {AIR_FORMAT})"
    return None
