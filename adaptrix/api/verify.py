"""adaptrix verify: check a compiled artifact against its manifest and say what differs.

Checks, in order: the manifest is a complete Adaptrix manifest (else a one-line error, exit 2),
and its sha256 is the one pinned with `expect`, if given; every output file it lists is there,
inside the artifact, with its size and sha256; no file was added beside them; every input it was
built from (adapter, base) still has the sha256 recorded, where the input is still at its path;
an ONNX artifact's graph still has the inputs and outputs the manifest lists. Each finding is one
line; the artifact is intact when there are none.

What this proves: the files are the ones the manifest lists. What it cannot: that the manifest
itself is the one the compile wrote (anyone who can change the files can rewrite the manifest
with their hashes); pin its sha256 (`expect`) for that. See docs/verify.md.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from adaptrix.api.manifest import MANIFEST_NAME, check_manifest, is_sha256
from adaptrix.artifacts import GGUF_MODEL, MODEL_NAME
from adaptrix.io.hashing import sha256_file
from adaptrix.io.jsonfile import loads_strict, read_bounded
from adaptrix.ir.errors import BadInputError

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
    manifest_sha256: str = ""

    @property
    def ok(self) -> bool:
        """Whether nothing differs from the manifest."""
        return not self.problems

    def as_json(self) -> dict:
        """The report as a JSON-able dict (schema 1)."""
        return {"schema": 1, "artifact": self.artifact, "target": self.target, "ok": self.ok,
                "manifest_sha256": self.manifest_sha256, "checked_files": self.checked_files,
                "checked_inputs": self.checked_inputs, "problems": self.problems,
                "notes": self.notes}  # fmt: skip


def verify_artifact(path: Path | str, *, inputs: bool = True, expect: str | None = None) -> VerifyReport:
    """Check the artifact at `path` against its manifest.json.

    `inputs=False`: skip the inputs; `expect`: the sha256 the manifest.json must have.
    """
    root = Path(path)
    pinned = _pinned(expect)
    real_root = Path(os.path.realpath(root))
    manifest, digest = _manifest(root, real_root)
    problems, notes = [], []
    if pinned is not None and digest != pinned:
        problems.append(f"{MANIFEST_NAME}: sha256 {digest}, expected {pinned} (--expect)")
    outputs = manifest["outputs"]
    for name, expected in sorted(outputs.items()):
        problems.extend(_check_output(root, real_root, name, expected))
    known = set(outputs) | {MANIFEST_NAME}
    problems.extend(f"{name}: not in the manifest (added after the compile)"
                    for name in _present(root) if name not in known)  # fmt: skip
    checked_inputs = 0
    if inputs:
        for label, group in sorted(manifest["inputs"].items()):
            found, missing = _check_input(label, group)
            problems.extend(found)
            notes.extend(missing)
            checked_inputs += len(group["files"]) - len(missing)
    if "onnx" in manifest:
        problems.extend(_check_graph(root, real_root, manifest["onnx"]))
    if "gguf" in manifest:
        problems.extend(_check_gguf(root, real_root, manifest["gguf"]))
    return VerifyReport(str(root), manifest["target"], len(outputs), checked_inputs, problems, notes, digest)


def _pinned(expect: str | None) -> str | None:
    """The sha256 given to pin the manifest, lower-cased; a malformed one is refused."""
    if expect is None:
        return None
    pinned = expect.strip().lower()
    if not is_sha256(pinned):
        raise BadInputError(f"--expect {expect!r} is not a sha256 (64 hex digits)",
                            fix="give the manifest_sha256 an earlier `adaptrix verify` printed")  # fmt: skip
    return pinned


def _manifest(root: Path, real_root: Path) -> tuple[dict, str]:
    """The checked manifest and the sha256 of its bytes."""
    file = root / MANIFEST_NAME
    if not file.is_file():
        raise BadInputError(f"has no {MANIFEST_NAME}", path=root,
                            fix="give a directory that `adaptrix compile` wrote")  # fmt: skip
    if not _inside(real_root, file):
        raise BadInputError(f"{MANIFEST_NAME} is a link that leads out of the artifact", path=root,
                            fix="give the directory a compile wrote: it writes no links")  # fmt: skip
    data = read_bounded(file, what="JSON manifest")  # read once: the hash is of the bytes checked
    manifest = loads_strict(data, path=file, what="JSON manifest")
    check_manifest(manifest, file)
    return manifest, hashlib.sha256(data).hexdigest()


def _inside(real_root: Path, file: Path) -> bool:
    """Whether `file`, with every link resolved, lies inside the artifact."""
    return Path(os.path.realpath(file)).is_relative_to(real_root)


def _check_output(root: Path, real_root: Path, name: str, expected: dict) -> list[str]:
    file = root / name
    if not _inside(real_root, file):
        return [f"{name}: a link that leads out of the artifact"]  # never opened
    if not file.is_file():
        return [f"{name}: missing"]
    size = file.stat().st_size
    if size != expected["bytes"]:
        return [f"{name}: {size} bytes, the manifest says {expected['bytes']}"]
    if sha256_file(file) != expected["sha256"]:
        return [f"{name}: sha256 differs from the manifest's (same size: the contents changed)"]
    return []


def _present(root: Path) -> list[str]:
    """Every file and link in the artifact, relative to it; links to folders are not entered."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        links = [name for name in dirs if (here / name).is_symlink()]
        found += [str((here / name).relative_to(root)) for name in [*files, *links]]
        dirs[:] = sorted(set(dirs) - set(links))
    return sorted(found)


def _check_input(label: str, group: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) for one input group {path, files: {name: sha256}}."""
    problems, notes = [], []
    root = Path(group["path"])
    for name, digest in sorted(group["files"].items()):
        file = root if root.is_file() and root.name == name else root / name
        if not file.is_file():
            notes.append(f"input {label} {file}: not there any more, not checked")
        elif sha256_file(file) != digest:
            problems.append(f"input {label} {file}: changed since the compile (sha256 differs)")
    return problems, notes


def _check_graph(root: Path, real_root: Path, section: dict) -> list[str]:
    """The graph's inputs are the manifest's fed inputs, in order, then its LoRA / IA3 inputs."""
    import onnx
    from google.protobuf.message import DecodeError

    file = root / MODEL_NAME
    if not file.is_file() or not _inside(real_root, file):
        return []  # reported as a missing or outside output already
    try:
        graph = onnx.load(file, load_external_data=False).graph
    except (OSError, ValueError, DecodeError) as exc:
        return [f"model.onnx: onnx cannot read it ({type(exc).__name__})"]
    adapter_inputs = set(section.get("lora", {}).get("inputs", {}))
    problems = []
    names = [value.name for value in graph.input]
    fed = [name for name in names if name not in adapter_inputs]
    if section.get("inputs") is not None and fed != section["inputs"]:
        problems.append(f"model.onnx: its inputs {fed} are not the manifest's {section['inputs']}")
    missing = sorted(adapter_inputs - set(names))
    if missing:
        problems.append(f"model.onnx: lacks the adapter inputs the manifest lists: {', '.join(missing[:5])}")
    outputs = [value.name for value in graph.output]
    if section.get("outputs") is not None and outputs != section["outputs"]:
        problems.append(f"model.onnx: its outputs {outputs} are not the manifest's {section['outputs']}")
    return problems


def _check_gguf(root: Path, real_root: Path, section: dict) -> list[str]:
    """The GGUF files parse, hold the manifest's architecture and tensor count; LoRA files are adapters."""
    from gguf import GGUFReader

    problems = []
    files = {
        GGUF_MODEL: "model",
        **{entry["file"]: "adapter" for entry in (section.get("lora") or {}).values()},
    }
    for name, kind in files.items():
        file = root / name
        if not file.is_file() or not _inside(real_root, file):
            continue  # reported as a missing or outside output already
        try:
            reader = GGUFReader(file)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: not a GGUF file llama.cpp's reader can parse ({type(exc).__name__})")
            continue
        fields = {key: reader.fields[key].contents() for key in ("general.architecture", "general.type")
                  if key in reader.fields}  # fmt: skip
        if fields.get("general.type", "model") != kind:
            problems.append(f"{name}: general.type is {fields.get('general.type')!r}, not {kind!r}")
        if section.get("architecture") and fields.get("general.architecture") != section["architecture"]:
            problems.append(f"{name}: architecture {fields.get('general.architecture')!r}, the manifest says "
                            f"{section['architecture']!r}")  # fmt: skip
        if (
            kind == "model"
            and section.get("tensors") is not None
            and len(reader.tensors) != section["tensors"]
        ):
            problems.append(f"{name}: {len(reader.tensors)} tensors, the manifest says {section['tensors']}")
    return problems
