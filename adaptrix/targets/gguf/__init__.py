"""The `gguf` target: llama.cpp's file format, merged (one model.gguf) or unmerged (GGUF LoRA files).

Merged: the base streamed tensor by tensor from its memory-mapped checkpoint, each touched tensor
merged in float32 and rounded once to the chosen type (`--quantize`, default the base's dtype),
written with the `gguf` package (llama.cpp's own writer, tensor map and quantizers) together with
the tokenizer and chat template. Unmerged: the base's GGUF (built once per base and type, cached)
and one GGUF LoRA adapter per adapter, every per-module scale folded into its B, which llama.cpp
applies at load time (`--lora`, `llama_adapter_lora_init`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adaptrix.artifacts import GGUF_LORA_SUFFIX, GGUF_MODEL
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import AdapterIR
from adaptrix.targets.gguf.cache import cached_base
from adaptrix.targets.gguf.families import family_of
from adaptrix.targets.gguf.lora import lora_tensors, write_lora_gguf
from adaptrix.targets.gguf.model import FILE_TYPES, write_model_gguf
from adaptrix.targets.written import Written

__all__ = ["QUANTIZE_CHOICES", "write_gguf"]

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = tuple(FILE_TYPES)
_FROM_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def write_gguf(
    ir: AdapterIR,
    base: Checkpoint,
    out: Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    adapters: Sequence[tuple[str, AdapterIR]] = (),
    unmerged: bool = False,
    quantize: str | None = None,
    cache_dir: Path | str | None = None,
) -> Written:
    """Write model.gguf (merged), or the base's model.gguf and NAME.lora.gguf per adapter (unmerged)."""
    adapters = list(adapters) or [("adapter", ir)]
    if len(adapters) > 1 and not unmerged:
        raise BadInputError(f"{len(adapters)} adapters given for one merged model",
                            fix="pass --unmerged to ship them as GGUF LoRA files")  # fmt: skip
    quantize = _file_type(quantize, dtype, base)
    family = family_of(base.config, base.path)  # an unsupported family: refused before anything is written
    if not unmerged:
        section, digest = write_model_gguf(ir, base, out / GGUF_MODEL, family, quantize, progress)
        return Written([GGUF_MODEL], {"gguf": section}, {GGUF_MODEL: digest})
    loras = [(name, lora_tensors(each, base, family)) for name, each in adapters]  # refusals come first
    cached, section = cached_base(base, family, quantize, cache_dir)
    shutil.copyfile(cached, out / GGUF_MODEL)
    files = [GGUF_MODEL]
    section["lora"] = {}
    for name, tensors in loras:
        file = f"{name}{GGUF_LORA_SUFFIX}"
        section["lora"][name] = {"file": file, **write_lora_gguf(tensors, family, out / file, name)}
        files.append(file)
    return Written(files, {"gguf": section})


def _file_type(quantize: str | None, dtype: torch.dtype | None, base: Checkpoint) -> str:
    """The GGUF file type: --quantize, else --dtype's, else the base's dtype's."""
    if quantize is not None:
        if quantize not in FILE_TYPES:
            raise BadInputError(f"unknown --quantize {quantize!r} for --target gguf",
                                fix=f"choose one of: {', '.join(FILE_TYPES)}")  # fmt: skip
        if dtype is not None:
            raise BadInputError("--dtype and --quantize both set the GGUF file type",
                                fix="give one of them")  # fmt: skip
        return quantize
    chosen = dtype or base.dtype()
    if chosen not in _FROM_DTYPE:
        raise BadInputError(f"no GGUF file type for {chosen}", fix=f"pass --quantize {'|'.join(FILE_TYPES)}")
    return _FROM_DTYPE[chosen]
