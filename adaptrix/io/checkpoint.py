"""A lazy reader of a base model directory: sharded safetensors, one tensor at a time."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch

from adaptrix.binders import BINDERS, Binder
from adaptrix.binders.tree import tree_binder
from adaptrix.io.checkpoint_layout import check_layout
from adaptrix.io.jsonfile import read_json
from adaptrix.io.quantized import qlora_quantization, quantization_of, with_conv1d
from adaptrix.io.safetensors_io import TensorInfo, read_elements, read_header, read_tensor
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import SourceModel

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint", "base_roots", "binder_for", "read_config"]

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FIX_INDEX = "restore the index save_pretrained wrote"
_FIX_MODEL = "the config.json and the weights are of different models: restore the base as it was saved"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class Checkpoint:
    """A base model directory: its config, binder, dimensions and tensors, read on demand.

    Each tensor is read through a memory map that is opened for that read and closed after
    it, so the pages of the checkpoint never accumulate in the process's resident memory.
    """

    def __init__(self, path: Path | str, qlora_base: Path | str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BadInputError(
                "does not exist or is not a directory",
                path=self.path,
                fix="pass the base model's directory as --base",
            )
        self.config = read_config(self.path)
        self.shards, weight_map = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            found, _ = read_header(shard)
            if overlap := self.tensors.keys() & found.keys():
                raise BadInputError(f"repeats tensor {sorted(overlap)[0]!r}", path=shard)
            self.tensors.update(found)
        if weight_map is not None:
            _check_weight_map(weight_map, self.tensors, self.path / INDEX_NAME)
        self.stored = self.tensors  # as stored; `tensors`: a quantized base's weights as plain ones
        self.quantization, self.tensors = quantization_of(
            self.config, self.path / "config.json", self.stored, self._read_stored
        )
        self.binder: Binder = _binder(self.config, self.path / "config.json", self.tensors)
        if self.quantization is not None:
            self.quantization, self.tensors = with_conv1d(self.quantization, self.tensors, self.binder)
        self.source: SourceModel = self.binder.source_model(self.config, self.path / "config.json")
        check_layout(self.binder, self.config, self.source, self.tensors, self.path / "config.json")
        if qlora_base is not None:
            if self.quantization is not None:
                raise BadInputError("--qlora-base is for a full-precision base; this one is quantized",
                                    path=self.path, fix="leave out --qlora-base")  # fmt: skip
            self.quantization = qlora_quantization(Path(qlora_base), self.tensors, self.binder)

    def _shard_files(self) -> tuple[list[Path], dict[str, str] | None]:
        """The shard files, and the index's weight_map (None for a single file)."""
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.is_file() and single.is_file():
            raise BadInputError(
                f"holds both {SINGLE_NAME} and {INDEX_NAME}: which is the model is ambiguous",
                path=self.path,
                fix="remove the one that is not the model's weights",
            )
        if index.is_file():
            weight_map = _read_weight_map(index)
            names = list(dict.fromkeys(weight_map.values()))
            shards = [_shard_inside(self.path, name, index) for name in names]
            _check_all_named(self.path, shards, index)
            return shards, weight_map
        if single.is_file():
            return [single], None
        raise BadInputError(
            "has no model.safetensors or model.safetensors.index.json",
            path=self.path,
            fix="re-save the base with save_pretrained(..., safe_serialization=True)",
        )

    def info(self, name: str) -> TensorInfo | None:
        """Where a tensor lies, or None."""
        return self.tensors.get(name)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its dtype (a quantized weight: dequantized, as its library does)."""
        if self.quantization is not None and name in self.quantization.groups:
            return self.quantization.read(name, self._read_stored, self.tensors[name])
        return self._read_stored(name)

    def elements(self, name: str, flat_indices: list[int]) -> torch.Tensor:
        """A few elements of a tensor by flat index, as float32 (a computed one is read whole)."""
        if self.computed(name):
            return self.read(name).reshape(-1)[flat_indices].to(torch.float32)
        return read_elements(self.tensors[name], flat_indices)

    def computed(self, name: str) -> bool:
        """Whether a tensor's value is computed (dequantized), not its stored bytes."""
        return self.quantization is not None and name in self.quantization.groups

    def _read_stored(self, name: str) -> torch.Tensor:
        return read_tensor(self.stored[name].file, name)

    def module_names(self) -> list[str]:
        """The modules that own the base's tensors, in checkpoint order, then a tied head (no tensor)."""
        names = list(dict.fromkeys(name.rpartition(".")[0] for name in self.tensors))
        head = self.binder.lm_head_weight.rpartition(".")[0]
        return names if head in names else [*names, head]

    def dtype(self) -> torch.dtype:
        """The dtype most of the base's floating-point weights are stored in."""
        counts = Counter(info.dtype for info in self.tensors.values() if info.dtype.is_floating_point)
        return counts.most_common(1)[0][0] if counts else torch.float32

    def files(self) -> list[Path]:
        """Every regular file of the base directory (its inputs, for the manifest)."""
        return sorted(p for p in self.path.iterdir() if p.is_file())


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name, all strings."""
    raw = read_json(index, what="weights index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError("has no weight_map", path=index, fix=_FIX_INDEX)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            kind = type(shard).__name__
            raise BadInputError(
                f"maps tensor {name!r} to a {kind}, not a file name", path=index, fix=_FIX_INDEX
            )
    return weight_map


def _shard_inside(base: Path, name: str, index: Path) -> Path:
    """The shard file `name` of the index, which must lie inside the base directory."""
    relative = Path(name)
    inside = "\0" not in name and not relative.is_absolute() and ".." not in relative.parts
    if inside:  # a symlink may still lead out
        resolved = Path(os.path.realpath(base / relative))
        inside = any(resolved.is_relative_to(root) for root in base_roots(base))
    if not inside:
        raise BadInputError(
            f"names shard {name!r}, which lies outside the base directory",
            path=index,
            fix="an index may name only files inside the base directory; restore it",
        )
    try:
        found = (base / relative).is_file()
    except OSError as exc:
        raise BadInputError(
            f"names shard {name!r}, which cannot be read ({exc.strerror})", path=index
        ) from None
    if not found:
        raise BadInputError(f"names shard {name!r} which is missing", path=index)
    return base / relative


def _check_all_named(base: Path, shards: list[Path], index: Path) -> None:
    """Every shard save_pretrained names model-NNNNN-of-NNNNN.safetensors in the base is in the index."""
    named = {Path(os.path.realpath(shard)) for shard in shards}
    for file in sorted(base.glob("model-*-of-*.safetensors")):
        if _SHARD_NAME.fullmatch(file.name) and Path(os.path.realpath(file)) not in named:
            raise BadInputError(f"names no tensor of shard {file.name}, which the base holds", path=index,
                                fix=_FIX_INDEX)  # fmt: skip


def base_roots(base: Path) -> list[Path]:
    """Where a base's shards may lie: inside it, and in a Hugging Face cache, its repository's blobs."""
    root = Path(os.path.realpath(base))
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return [root, repo / "blobs"]
    return [root]


def _check_weight_map(weight_map: dict[str, str], tensors: dict[str, TensorInfo], index: Path) -> None:
    """Every tensor of every shard is in the weight_map, in its shard; and nothing else is."""
    for name, info in tensors.items():
        shard = weight_map.get(name)
        if shard is None:
            raise BadInputError(f"does not list tensor {name!r}, which {info.file.name} holds", path=index,
                                fix=_FIX_INDEX)  # fmt: skip
        if Path(shard) != info.file.relative_to(index.parent):
            raise BadInputError(f"puts tensor {name!r} in {shard}, but {info.file.name} holds it",
                                path=index, fix=_FIX_INDEX)  # fmt: skip
    for name, shard in weight_map.items():
        if name not in tensors:
            raise BadInputError(f"puts tensor {name!r} in {shard}, which does not hold it", path=index,
                                fix=_FIX_INDEX)  # fmt: skip


def read_config(path: Path) -> dict:
    """Read a base's config.json, with errors a user can act on."""
    file = path / "config.json"
    if not file.is_file():
        raise BadInputError(
            "has no config.json", path=path, fix="pass a Hugging Face model directory as --base"
        )
    config = read_json(file, what="JSON")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BadInputError("has no model_type", path=file, fix="re-save the base with save_pretrained")
    return config


def binder_for(base: Path) -> Binder:
    """The binder for a base model directory, chosen from its config.json (its table, else its tree)."""
    config, file = read_config(base), base / "config.json"
    table = _table(config, file)
    return table if table is not None else tree_binder(config, file, None)


def _table(config: dict, file: Path) -> Binder | None:
    """The family's table bound to the config, or None (no table, or sizes the table cannot read)."""
    table = BINDERS.get(str(config["model_type"]))
    if table is None:
        return None
    for first, second in table.same_sizes:
        if config.get(second) is not None and config.get(first) != config.get(second):
            logger.warning("%s: %s %s != %s %s: the %s role table reads one size; its modules get module "
                           "roles (merged, hooks and --to peft only)", file, first, config.get(first),
                           second, config.get(second), table.name)  # fmt: skip
            return None
    return table.bind(config, file)


def _fix_model() -> str:
    """What to do about weights the model has no place for; transformers 5 renames and packs some."""
    from transformers import __version__

    if int(__version__.split(".")[0]) >= 5:
        return ("or the base stores tensors transformers 5 renames or packs on load (MoE experts): "
                "compile it with transformers 4.57; else restore the base as it was saved")  # fmt: skip
    return _FIX_MODEL


def _binder(config: dict, file: Path, tensors: dict[str, TensorInfo]) -> Binder:
    """The family's table where it places every module with a weight; else widened by the module tree."""
    table = _table(config, file)
    if table is not None and any(not any(map(stack.match, tensors)) for stack in table.stacks):
        logger.info("%s: a stack of the %s table holds no layer (a decoder alone): module roles", file,
                    table.name)  # fmt: skip
        table = None  # BartForCausalLM: the decoder's layers only
    if table is not None and all(
        table.resolve(name.rpartition(".")[0]) is not None for name in tensors if name.endswith(".weight")
    ):
        return table
    binder = tree_binder(config, file, table)
    known = binder.tree_tensors
    for name in tensors:
        if name not in known and name.partition(".")[2] not in known:
            raise BadInputError(f"describes a {config['model_type']} model, which has no tensor {name!r} "
                                "of the base", path=file, fix=_fix_model())  # fmt: skip
    return binder
