"""The base's files that are not its weights, carried into an output: configs, tokenizer, folders.

Everything of the base directory is carried (sentence-transformers' `modules.json`,
`1_Pooling/`, `2_Normalize/`, README, tokenizer files, ...) except its weights in any format:
the output's weights are the merged ones, and a `pytorch_model.bin` or an `onnx/` export left
beside them would be the base's, not the output's. Weights inside a folder that `modules.json`
names as another module (a sentence-transformers `2_Dense/`) are that module's own and carried.
Nothing is followed out of the base: a symlink that leads outside it (other than a Hugging Face
cache snapshot's link into its own `blobs/`) or to a folder is refused. What is left out is
logged and listed, with the reason, in the merged target's manifest (`not_carried`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptrix.artifacts import MANIFEST_NAME
from adaptrix.io.checkpoint import INDEX_NAME, Checkpoint, base_roots
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

__all__ = ["SidePlan", "copy_side_files", "plan_side_files", "write_config"]

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx", ".onnx_data",
    ".ot", ".tflite", ".pb", ".npz", ".pdparams", ".mlmodel",
)  # fmt: skip
CONFIG_NAME = "config.json"
MAX_FILES = 10_000
MAX_BYTES = 2 << 30  # side files beyond this are not a model's configs and tokenizer
MAX_DEPTH = 8
_HIDDEN = "hidden"
_OWN = {MANIFEST_NAME: "the output has its own manifest"}


@dataclass(slots=True)
class SidePlan:
    """What of the base is carried, and what is left out with the reason.

    `files`: (source file, name relative to the base); `folders`: kept even when empty.
    """

    files: list[tuple[Path, str]] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    size: int = 0

    def copy(self, out: Path) -> list[str]:
        """Copy the planned files into `out` (config.json excepted: the caller rewrites it)."""
        for folder in self.folders:
            (out / folder).mkdir(parents=True, exist_ok=True)
        copied = []
        for source, name in self.files:
            if name == CONFIG_NAME:
                continue
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, out / name)
            copied.append(name)
        for name, why in self.skipped.items():  # hidden files (.git, .gitattributes) are no news
            level = logging.DEBUG if why == _HIDDEN else logging.WARNING
            logger.log(level, "not carried into the output: %s (%s)", name, why)
        return copied


def plan_side_files(base: Checkpoint) -> SidePlan:
    """Plan what of the base directory to carry into an output; refuse what leads out of it."""
    root = base.path.resolve()
    plan = SidePlan()
    merged = {str(Path(shard).resolve()) for shard in base.shards}
    _walk(root, root, "", 0, plan, merged, _module_folders(root))
    _skip_companions(plan)
    return plan


def _module_folders(root: Path) -> set[str]:
    """Folders that sentence-transformers' modules.json names as modules other than the base's."""
    file = root / "modules.json"
    if not file.is_file():
        return set()
    modules = read_json(_inside(root, file, file.name), what="sentence-transformers modules.json")
    if not isinstance(modules, list):
        return set()
    paths = (m.get("path") for m in modules if isinstance(m, dict))
    return {p.strip("/") for p in paths if isinstance(p, str) and p.strip("/")}


def _walk(root: Path, folder: Path, rel: str, depth: int, plan: SidePlan, merged: set, modules: set) -> None:
    if depth > MAX_DEPTH:
        raise BadInputError(f"nests folders deeper than {MAX_DEPTH} levels at {rel}", path=root,
                            fix="move what is not part of the model out of the base directory")  # fmt: skip
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise BadInputError(f"{rel or '.'} cannot be read ({exc.strerror or exc})", path=root) from None
    if not entries and rel:
        plan.folders.append(rel)
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        if entry.name.startswith("."):
            plan.skipped[name] = _HIDDEN
            continue
        path = Path(entry.path)
        source = _inside(root, path, name)
        if source.is_dir():
            _walk(root, source, name, depth + 1, plan, merged, modules)
            continue
        if str(source) in merged or (not rel and entry.name == INDEX_NAME):
            continue  # the weights being merged
        why = _left_out(name, source, rel, modules)
        if why:
            plan.skipped[name] = why
        else:
            plan.files.append((source, name))
            plan.size += source.stat().st_size
        if len(plan.files) + len(plan.skipped) > MAX_FILES or plan.size > MAX_BYTES:
            raise BadInputError(
                f"holds more than {MAX_FILES} side files or {MAX_BYTES >> 30} GB of them (at {name})",
                path=root,
                fix="move what is not part of the model out of the base directory",
            )


def _inside(root: Path, path: Path, name: str) -> Path:
    """The file or folder an entry is, refused where a symlink leads out of the base or to a folder."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    inside = any(target.is_relative_to(place) for place in base_roots(root))  # the HF cache's blobs too
    if not target.exists() or target.is_dir() or not inside:
        what = "a broken symlink" if not target.exists() else f"a symlink to {target}"
        raise BadInputError(
            f"{name} is {what}: files are never followed out of the base, nor symlinked folders",
            path=root,
            fix="replace the link with a copy of the file, or remove it",
        )
    return target


def _left_out(name: str, source: Path, rel: str, modules: set) -> str | None:
    """Why a file of the base is not carried, or None."""
    if not stat.S_ISREG(source.stat().st_mode):
        return "not a regular file"
    if not rel and name in _OWN:
        return _OWN[name]
    weights = name.endswith(WEIGHT_SUFFIXES) or (
        name.endswith(".index.json") and name.removesuffix(".index.json").endswith(WEIGHT_SUFFIXES)
    )
    if weights and not (rel and rel.split("/")[0] in modules):
        return "weights the merged model does not match"
    return None


def _skip_companions(plan: SidePlan) -> None:
    """An OpenVINO graph (.xml) whose weights (.bin of the same stem) are left out goes with them."""
    stems = {name.rsplit(".", 1)[0] for name, why in plan.skipped.items() if why.startswith("weights")}
    kept = []
    for source, name in plan.files:
        if name.endswith(".xml") and name.removesuffix(".xml") in stems:
            plan.skipped[name] = "goes with weights left out"
            plan.size -= source.stat().st_size
        else:
            kept.append((source, name))
    plan.files = kept


def copy_side_files(base: Checkpoint, out: Path, dtype, untied: bool) -> list[str]:
    """Config (updated), tokenizer files, folders: everything of the base but its weights."""
    copied = plan_side_files(base).copy(out)
    write_config(base, out / CONFIG_NAME, dtype or base.dtype(), untied)
    return [*copied, CONFIG_NAME]


def write_config(
    base: Checkpoint, file: Path, dtype: torch.dtype, untied: bool, updates=None, keep_quantization=False
) -> None:
    """The base's config.json for the output: its dtype, an untied head, a task model's changes."""
    config = {**base.config, **(updates or {})}
    if not keep_quantization:
        config.pop("quantization_config", None)  # a quantized base's weights are written dequantized
    key = "dtype" if "dtype" in config else "torch_dtype"
    config[key] = str(dtype).removeprefix("torch.")
    if untied:
        config["tie_word_embeddings"] = False
        logger.info("untied lm_head from the embedding: the adapter changes one and not the other")
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
