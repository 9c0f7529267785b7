"""adaptrix verify: check a compiled artifact against its manifest and say what differs.

Checks, in order: the manifest is readable; every output file it lists is there with its size
and sha256 (`outputs`, written since manifest format 1 with adaptrix 0.1); no file was added
beside them; every input it was built from (adapter, base) still has the sha256 recorded, where
the input is still at its path; an ONNX artifact's graph still has the inputs and outputs the
manifest lists. Each finding is one line; the artifact is intact when there are none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from adaptrix.toolchain.errors import BadInputError
from adaptrix.toolchain.hashing import sha256_file
from adaptrix.toolchain.manifest import MANIFEST_NAME

__all__ = ["VerifyReport", "verify_artifact"]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `adaptrix verify` found: `problems` make the artifact not intact; `notes` do not."""

    artifact: str
    target: str
    checked_files: int
    checked_inputs: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing differs from the manifest."""
        return not self.problems

    def as_json(self) -> dict:
        """The report as a JSON-able dict (schema 1)."""
        return {"schema": 1, "artifact": self.artifact, "target": self.target, "ok": self.ok,
                "checked_files": self.checked_files, "checked_inputs": self.checked_inputs,
                "problems": self.problems, "notes": self.notes}  # fmt: skip


def verify_artifact(path: Path | str, *, inputs: bool = True) -> VerifyReport:
    """Check the artifact at `path` against its manifest.json (`inputs=False`: skip the inputs)."""
    root = Path(path)
    manifest = _manifest(root)
    problems, notes = [], []
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict):
        notes.append("the manifest records no output hashes (an older adaptrix): files checked by presence")
        outputs = {name: None for name in manifest.get("files", [])}
    for name, expected in sorted(outputs.items()):
        problems.extend(_check_output(root, name, expected))
    known = set(outputs) | {MANIFEST_NAME}
    extra = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    problems.extend(
        f"{name}: not in the manifest (added after the compile)" for name in extra if name not in known
    )
    checked_inputs = 0
    if inputs:
        for label, group in sorted((manifest.get("inputs") or {}).items()):
            found, missing = _check_input(label, group)
            problems.extend(found)
            notes.extend(missing)
            checked_inputs += len(group.get("files", {})) - len(missing)
    if isinstance(manifest.get("onnx"), dict):
        problems.extend(_check_graph(root, manifest["onnx"]))
    return VerifyReport(str(root), str(manifest.get("target")), len(outputs), checked_inputs, problems, notes)


def _manifest(root: Path) -> dict:
    file = root / MANIFEST_NAME
    if not file.is_file():
        raise BadInputError(f"has no {MANIFEST_NAME}", path=root,
                            fix="give a directory that `adaptrix compile` wrote")  # fmt: skip
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"is not valid JSON ({exc})", path=file) from None
    if not isinstance(manifest, dict) or "target" not in manifest:
        raise BadInputError("is not an Adaptrix manifest (no target)", path=file)
    return manifest


def _check_output(root: Path, name: str, expected: dict | None) -> list[str]:
    file = root / name
    if not file.is_file():
        return [f"{name}: missing"]
    if expected is None:
        return []
    size = file.stat().st_size
    if size != expected.get("bytes"):
        return [f"{name}: {size} bytes, the manifest says {expected.get('bytes')}"]
    if sha256_file(file) != expected.get("sha256"):
        return [f"{name}: sha256 differs from the manifest's (same size: the contents changed)"]
    return []


def _check_input(label: str, group: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) for one input group {path, files: {name: sha256}}."""
    problems, notes = [], []
    root = Path(str(group.get("path", "")))
    for name, digest in sorted((group.get("files") or {}).items()):
        file = root if root.is_file() and root.name == name else root / name
        if not file.is_file():
            notes.append(f"input {label} {file}: not there any more, not checked")
        elif sha256_file(file) != digest:
            problems.append(f"input {label} {file}: changed since the compile (sha256 differs)")
    return problems, notes


def _check_graph(root: Path, section: dict) -> list[str]:
    import onnx
    from google.protobuf.message import DecodeError

    file = root / "model.onnx"
    if not file.is_file():
        return []  # reported as a missing output already
    try:
        graph = onnx.load(file, load_external_data=False).graph
    except (OSError, ValueError, DecodeError) as exc:
        return [f"model.onnx: onnx cannot read it ({type(exc).__name__})"]
    problems = []
    for kind, values in (("inputs", graph.input), ("outputs", graph.output)):
        names = [value.name for value in values]
        if section.get(kind) is not None and names != section[kind]:
            problems.append(f"model.onnx: its {kind} {names} are not the manifest's {section[kind]}")
    return problems
