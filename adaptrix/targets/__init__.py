"""The registry of targets: each turns an IR and a base into files."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.registry import registry
from adaptrix.targets.hooks import write_hooks
from adaptrix.targets.merged import write_merged
from adaptrix.targets.written import Written

__all__ = ["TARGETS", "Target", "Written", "target_named"]


@dataclass(frozen=True, slots=True)
class Target:
    """A named output format: `write(ir, base, out, dtype=, progress=)` fills directory `out`."""

    name: str
    summary: str
    write: Callable[..., Written]
    default_dtype: torch.dtype | None = None  # None: the base's
    options: tuple[str, ...] = ()  # the keyword options `write` takes beyond the common ones
    several: bool = False  # takes several adapters at once (`adapters=[(name, ir), ...]`)
    phases: bool = False  # `write` takes `phase=`, a callable it gives the label of each long phase
    routes: bool = False  # emits the router of a routed IR (`--pass route`)
    dequantized_copy: bool = False  # reads a quantized base as its cached dequantized copy (api/dequantized)


def _onnx(target: str) -> Callable[..., Written]:
    """The ONNX writer for `target`, imported on first use (onnx and onnxruntime are heavy)."""

    def write(*args, **kwargs) -> Written:
        module = importlib.import_module("adaptrix.targets.onnx")
        return module.write_onnx(*args, target=target, **kwargs)

    write.__module__ = "adaptrix.targets.onnx"  # what it runs, as functools.wraps would say
    return write


def _gguf(*args, **kwargs) -> Written:
    """The gguf writer, imported on first use; refused in one line where the `gguf` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise UnsupportedError("--target gguf writes with llama.cpp's `gguf` package, which is not installed",
                               fix='pip install "adaptrix[gguf]"')  # fmt: skip
    module = importlib.import_module("adaptrix.targets.gguf")
    return module.write_gguf(*args, **kwargs)


_gguf.__module__ = "adaptrix.targets.gguf"  # what it runs, as functools.wraps would say

_ONNX_OPTIONS = ("unmerged", "quantize", "block_size", "cache_dir", "calibration")
_ONNX_CUDA_OPTIONS = ("unmerged", "cache_dir")  # quantized weights are for the CPU provider's edge targets


def _register(*targets: Target) -> Mapping[str, Target]:
    return registry("target", ((target.name, target) for target in targets))


TARGETS = _register(
    Target(
        "merged",
        "Hugging Face model directory with the adapter merged (sharded safetensors)",
        write_merged,
        options=("merge_into", "qlora_base", "requantize"),
    ),
    Target(
        "hooks",
        "bundle of unmerged deltas for adaptrix.attach on an eager PyTorch model",
        write_hooks,
        default_dtype=torch.float32,
        options=("merge_into", "qlora_base"),
        routes=True,
    ),
    Target(
        "onnx-cpu",
        "onnxruntime model directory for the CPU provider (optimum, genai builder or torch.onnx), float32",
        _onnx("onnx-cpu"),
        default_dtype=torch.float32,
        options=_ONNX_OPTIONS,
        several=True,
        phases=True,
        routes=True,
        dequantized_copy=True,
    ),
    Target(
        "onnx-cuda",
        "onnxruntime model directory for the CUDA provider (optimum, genai builder or torch.onnx), float16",
        _onnx("onnx-cuda"),
        default_dtype=torch.float16,
        options=_ONNX_CUDA_OPTIONS,
        several=True,
        phases=True,
        routes=True,
        dequantized_copy=True,
    ),
    Target(
        "gguf",
        "one GGUF file for llama.cpp (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1), or GGUF LoRA",
        _gguf,
        options=("unmerged", "quantize", "cache_dir"),
        several=True,
    ),
)


def target_named(name: str) -> Target:
    """The target called `name`, or an error listing the known ones."""
    if name not in TARGETS:
        raise BadInputError(f"unknown target {name!r}", fix=f"choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]
