"""A lazy reader of a base model directory: sharded safetensors, one tensor at a time."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from adaptrix.toolchain.binders import Binder, binder_for_model_type
from adaptrix.toolchain.binders.table import read_config
from adaptrix.toolchain.errors import BadInputError
from adaptrix.toolchain.ir import SourceModel
from adaptrix.toolchain.safetensors_io import TensorInfo, read_header, read_tensor

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """A base model directory: its config, binder, dimensions and tensors, read on demand.

    Each tensor is read through a memory map that is opened for that read and closed after
    it, so the pages of the checkpoint never accumulate in the process's resident memory.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BadInputError(
                "does not exist or is not a directory",
                path=self.path,
                fix="pass the base model's directory as --base",
            )
        self.config = read_config(self.path)
        self.binder: Binder = binder_for_model_type(str(self.config["model_type"]), self.path / "config.json")
        self.source: SourceModel = self.binder.source_model(self.config, self.path / "config.json")
        self.shards = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            found, _ = read_header(shard)
            if overlap := self.tensors.keys() & found.keys():
                raise BadInputError(f"repeats tensor {sorted(overlap)[0]!r}", path=shard)
            self.tensors.update(found)

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise BadInputError("is not a valid weights index", path=index) from None
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise BadInputError(f"names shard {missing[0]} which is missing", path=index)
            return [self.path / n for n in names]
        if (self.path / SINGLE_NAME).is_file():
            return [self.path / SINGLE_NAME]
        raise BadInputError(
            "has no model.safetensors or model.safetensors.index.json",
            path=self.path,
            fix="re-save the base with save_pretrained(..., safe_serialization=True)",
        )

    def info(self, name: str) -> TensorInfo | None:
        """Where a tensor lies, or None."""
        return self.tensors.get(name)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype."""
        return read_tensor(self.tensors[name].file, name)

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
