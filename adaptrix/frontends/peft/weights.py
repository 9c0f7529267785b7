"""PEFT adapter weights: read lazily and grouped by the module they belong to."""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from adaptrix.artifacts import PEFT_WEIGHTS_NAME as SAFETENSORS_NAME
from adaptrix.frontends.peft.config import read_lora_settings
from adaptrix.frontends.peft.settings import LoraSettings
from adaptrix.io.safetensors_io import MAX_NAME, read_header, read_tensor
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import LazyTensor

__all__ = ["PeftAdapter", "PeftModule", "read_peft"]

logger = logging.getLogger(__name__)

BIN_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."

# What each saved key is, as a table: pattern -> the record slot it fills.
_KEY_KINDS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"(?P<m>.+)\.lora_A\.weight", "lora_a"),
        (r"(?P<m>.+)\.lora_B\.weight", "lora_b"),
        (r"(?P<m>.+)\.lora_B\.bias", "lora_b_bias"),
        (r"(?P<m>.+)\.lora_embedding_A", "embedding_a"),
        (r"(?P<m>.+)\.lora_embedding_B", "embedding_b"),
        (r"(?P<m>.+)\.lora_magnitude_vector(?:\.weight)?", "magnitude"),
        (r"(?P<m>.+)\.(?P<p>(?:hada|lokr)_[wt][12](?:_[ab])?|ia3_l|vera_lambda_[bd])", "factor"),
        (r"(?P<m>.+)\.base_layer\.(?P<p>weight|bias)", "param"),
        (r"(?P<m>.+)\.(?:original_module|modules_to_save)\.(?P<p>\w+)", "copy"),
        (r"(?P<m>.+)\.(?P<p>weight|bias)", "param"),
    )
)


@dataclass(slots=True)
class PeftModule:
    """Everything an adapter file holds for one module of the base model."""

    name: str
    lora_a: LazyTensor | None = None
    lora_b: LazyTensor | None = None
    lora_b_bias: LazyTensor | None = None
    embedding_a: LazyTensor | None = None
    embedding_b: LazyTensor | None = None
    magnitude: LazyTensor | None = None
    params: dict[str, LazyTensor] = field(default_factory=dict)
    factors: dict[str, LazyTensor] = field(default_factory=dict)  # LoHa, LoKr, IA3, VeRA tensors

    @property
    def has_delta(self) -> bool:
        """Whether the module carries the adapter's own weights (LoRA factors or another kind's)."""
        return self.has_lora or bool(self.factors)

    @property
    def has_lora(self) -> bool:
        """Whether the module carries LoRA factors (linear or embedding)."""
        return any(t is not None for t in (self.lora_a, self.lora_b, self.embedding_a, self.embedding_b))


@dataclass(frozen=True, slots=True)
class PeftAdapter:
    """A PEFT adapter directory: its settings and its weights grouped by module."""

    path: Path
    settings: LoraSettings
    weights_file: Path
    modules: dict[str, PeftModule]
    shared: dict[str, LazyTensor] = field(default_factory=dict)  # VeRA's projections: "A", "B"

    def files(self) -> list[Path]:
        """The files the adapter was read from."""
        return [self.settings.path, self.weights_file]


def read_peft(adapter: Path | str) -> PeftAdapter:
    """Read a PEFT adapter directory: config checked, weights indexed (not yet loaded)."""
    path = Path(adapter)
    if not path.is_dir():
        raise BadInputError(
            "does not exist or is not a directory", path=path, fix="pass a PEFT adapter directory"
        )
    settings = read_lora_settings(path)
    weights_file, tensors = _read_tensors(path)
    if not tensors:
        raise BadInputError("holds no tensors", path=weights_file, fix="re-save the adapter")
    # VeRA's shared projections sit outside any module: base_model.vera_A / vera_B.
    keys = {name: f"base_model.vera_{name}" for name in "AB"}
    shared = {name: tensors.pop(key) for name, key in keys.items() if key in tensors}
    return PeftAdapter(path, settings, weights_file, _group(tensors, weights_file), shared)


def _read_tensors(path: Path) -> tuple[Path, dict[str, LazyTensor]]:
    file = path / SAFETENSORS_NAME
    if file.is_file():
        infos, _ = read_header(file)
        return file, {
            name: LazyTensor(
                info.shape, f"{file}:{name}", partial(read_tensor, file, name), info.dtype.itemsize
            )
            for name, info in infos.items()
        }
    file = path / BIN_NAME
    if file.is_file():
        return file, {name: LazyTensor.of(value, f"{file}:{name}") for name, value in _load_bin(file).items()}
    raise BadInputError(
        f"has no {SAFETENSORS_NAME} or {BIN_NAME}",
        path=path,
        fix="the adapter's weights are missing: copy them in or re-save the adapter with save_pretrained",
    )


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict with torch's weights-only unpickler: it never runs code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise BadInputError(
            f"was refused: its pickle would run code or load non-tensor objects ({first})",
            path=file,
            fix="convert it to adapter_model.safetensors from a trusted copy",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BadInputError(f"is not a readable torch file ({type(exc).__name__})", path=file) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError("does not hold a dict of tensors", path=file, fix="re-save the adapter")
    return state


def _group(tensors: dict[str, LazyTensor], file: Path) -> dict[str, PeftModule]:
    modules: dict[str, PeftModule] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        kind, match = _classify(name, file)
        if kind == "copy":
            logger.debug("%s: %s is PEFT's copy of a saved module; the saved values are used", file, key)
            continue
        module = modules.setdefault(match.group("m"), PeftModule(match.group("m")))
        if kind == "param":
            module.params[match.group("p")] = tensor
        elif kind == "factor":
            module.factors[match.group("p")] = tensor
        else:
            setattr(module, kind, tensor)
    return modules


def _classify(name: str, file: Path) -> tuple[str, re.Match[str]]:
    for pattern, kind in _KEY_KINDS:
        match = pattern.fullmatch(name) if len(name) <= MAX_NAME and name.isprintable() else None
        if match:
            return kind, match
    raise BadInputError(
        f"holds tensor {name[:200]!r}, which is not part of a PEFT LoRA, LoHa, LoKr, IA3 or VeRA adapter",
        path=file,
        fix="remove it or re-save the adapter with PEFT",
    )
