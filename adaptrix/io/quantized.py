"""Quantized bases: bitsandbytes 4-bit and 8-bit checkpoints read as the weights they compute with.

transformers saves a bitsandbytes model with packed codes (`q_proj.weight`, uint8 or int8) beside
their statistics (`weight.absmax`, `weight.quant_map`, `weight.nested_*`,
`weight.quant_state.bitsandbytes__nf4`; 8-bit: `SCB`, `weight_format`). A `Quantization` shows
such a checkpoint as plain weights: each packed weight under its own name, with the shape and
dtype it has once dequantized, read one tensor at a time by bitsandbytes' own functions (never a
rewrite of them). With a `--qlora-base` config it does the reverse on a full-precision base:
each weight transformers would quantize is quantized and dequantized again, as in training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path

import torch

from adaptrix.binders.table import Binder, Layout
from adaptrix.io.bnb_cpu import dequantize_4bit
from adaptrix.io.bnb_import import bnb_functional, check_bnb, import_ahead
from adaptrix.io.jsonfile import loads_strict, read_json
from adaptrix.io.safetensors_io import TensorInfo
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["Quantization", "bnb_settings", "qlora_quantization", "quantization_of", "with_conv1d"]

_QS = ".quant_state.bitsandbytes__"
_LINEAR = (Layout.LINEAR, Layout.CONV1D)  # what transformers replaces by bitsandbytes modules
_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers keeps
_COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FIX_GPTQ = (
    "merge into the full-precision base the {} model was made from (--base ORIGINAL), then quantize "
    "the merged model with {} again"
)  # GPTQ / AWQ: their libraries need torch >= 2.14 (docs)
_FIX_FULL = "pass the full-precision base (with --qlora-base CONFIG if the adapter was trained on a bnb one)"
Read = Callable[[str], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Quantization:
    """How a base's quantized weights are read: scheme, mode, and the stored tensors of each."""

    settings: dict  # bits, quant_type, double_quant, skip
    mode: str  # "dequantized": a quantized checkpoint; "qlora-base": simulated on a full-precision one
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # weight -> its statistics' names
    transposed: frozenset[str] = frozenset()  # Conv1D weights, quantized as [out, in] (stored [in, out])

    def manifest(self, requantized: bool = False) -> dict:
        """The manifest's record of the merge mode and the scheme."""
        mode = "requantized" if requantized else self.mode
        return {"merge_into": mode, "scheme": "bitsandbytes", **self.settings}

    def read(self, name: str, read: Read, info: TensorInfo) -> torch.Tensor:
        """The value weight `name` computes with: 4-bit in the compute dtype, 8-bit in `info.dtype`.

        bitsandbytes' 4-bit matmul (gemm_4bit, with or without autograd) dequantizes straight into
        the activations' dtype, `bnb_4bit_compute_dtype`, not into the weight's stored dtype: a
        bfloat16 base trained in float32 computes with the unrounded float32 values.
        """
        functional = bnb_functional()
        flip = name in self.transposed
        if self.mode == "qlora-base":
            value = read(name)
            value = _simulate(functional, value.T.contiguous() if flip else value, self.settings)
        elif self.settings["bits"] == 8:
            scb = next(part for part in self.groups[name] if part.endswith(".SCB"))
            value = functional.int8_vectorwise_dequant(read(name), read(scb)).to(info.dtype)
        else:
            stats = {part.removeprefix(name + "."): read(part) for part in self.groups[name]}
            state = functional.QuantState.from_dict(stats, device=torch.device("cpu"))
            state.dtype = _compute_dtype(self.settings)  # what bitsandbytes' matmul dequantizes into
            value = dequantize_4bit(functional, read(name), state)  # its C kernel, not via torch.ops
        return value.T.contiguous() if flip else value

    def owner(self, name: str) -> str | None:
        """The quantized weight a stored tensor belongs to (the weight itself or its statistics)."""
        if name in self.groups:
            return name
        head, sep, _ = name.partition(".weight.")
        if sep and head + ".weight" in self.groups:
            return head + ".weight"
        module = name.removesuffix(".SCB").removesuffix(".weight_format")
        return module + ".weight" if module != name and module + ".weight" in self.groups else None

    def requantize(self, name: str, value: torch.Tensor, packed: TensorInfo) -> dict[str, torch.Tensor]:
        """A merged weight quantized again with the base's scheme: the tensors transformers saves.

        `value` is in the weight's own dtype; `packed` is the stored packed weight (its storage dtype).
        """
        functional = bnb_functional()
        value = value.T if name in self.transposed else value
        if self.settings["bits"] == 8:
            codes, scales, _ = functional.int8_vectorwise_quant(value.to(torch.float16))
            return {name: codes, name.removesuffix("weight") + "SCB": scales}
        codes, state = functional.quantize_4bit(
            value.contiguous(), blocksize=_BLOCKSIZE, compress_statistics=self.settings["double_quant"],
            quant_type=self.settings["quant_type"], quant_storage=packed.dtype,
        )  # fmt: skip
        return {name: codes, **{f"{name}.{key}": v for key, v in state.as_dict(packed=True).items()}}

    def dequantize(self, name: str, tensors: Mapping[str, torch.Tensor], info: TensorInfo) -> torch.Tensor:
        """What `requantize`'s tensors compute with (to measure the second rounding)."""
        return self.read(name, tensors.__getitem__, info)


def bnb_settings(config: object, path: Path) -> dict:
    """A bitsandbytes quantization_config's settings; any other scheme is refused, naming it."""
    if not isinstance(config, Mapping):
        raise BadInputError("has a quantization_config that is not an object", path=path)
    loads = {"bits": 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else None}
    method = str(config.get("quant_method", "bitsandbytes" if loads["bits"] else "unknown"))
    if method != "bitsandbytes" or loads["bits"] is None:
        shown = f"{method} ({config.get('bits', '?')}-bit)" if method != "bitsandbytes" else method
        raise UnsupportedError(
            f"is quantized with {shown}: Adaptrix reads only bitsandbytes 4-bit and 8-bit bases",
            path=path,
            fix=_FIX_GPTQ.format(method, method) if method in ("gptq", "awq") else _FIX_FULL,
        )
    skip = config.get("llm_int8_skip_modules") or []
    settings = {"bits": loads["bits"], "skip": [str(s) for s in skip]}
    if loads["bits"] == 4:
        settings["quant_type"] = str(config.get("bnb_4bit_quant_type", "fp4"))
        settings["double_quant"] = bool(config.get("bnb_4bit_use_double_quant", False))
        compute = config.get("bnb_4bit_compute_dtype") or "float32"  # transformers' default
        settings["compute_dtype"] = str(compute).removeprefix("torch.")
        if settings["compute_dtype"] not in _COMPUTE:
            raise UnsupportedError(f"has bnb_4bit_compute_dtype {settings['compute_dtype']!r}", path=path,
                                   fix=f"use one of {', '.join(_COMPUTE)}")  # fmt: skip
        if settings["quant_type"] not in ("nf4", "fp4"):
            raise UnsupportedError(f"has bnb_4bit_quant_type {settings['quant_type']!r}", path=path,
                                   fix="bitsandbytes 4-bit is nf4 or fp4")  # fmt: skip
    return settings


def quantization_of(
    config: Mapping, path: Path, tensors: dict[str, TensorInfo], read: Read
) -> tuple[Quantization | None, dict[str, TensorInfo]]:
    """A quantized checkpoint's Quantization and its tensors as plain weights (else None, as stored)."""
    if config.get("quantization_config") is None:
        return None, tensors
    settings = bnb_settings(config["quantization_config"], path)
    check_bnb()  # a clear error before anything else when bitsandbytes is missing
    import_ahead(dynamo=settings["bits"] == 8)  # 8-bit weights: a torch op, whose first call imports it
    groups = _groups_8bit(tensors) if settings["bits"] == 8 else _groups_4bit(tensors)
    hidden = {part for parts in groups.values() for part in parts}
    floats = [i.dtype for n, i in tensors.items() if i.dtype.is_floating_point and n not in hidden]
    default = Counter(floats).most_common(1)[0][0] if floats else torch.float16
    plain = {}
    for name, info in tensors.items():
        if name in hidden:
            continue
        if name in groups:
            shape, dtype = _logical(name, info, groups[name], read, default, settings)
            size = prod(shape) * dtype.itemsize
            info = TensorInfo(name, dtype, shape, info.file, info.start, size)
        plain[name] = info
    return Quantization(settings, "dequantized", groups), plain


def qlora_quantization(file: Path, tensors: Mapping[str, TensorInfo], binder: Binder) -> Quantization:
    """The training-time quantization of a full-precision base, from a quantization config file.

    Every weight transformers would quantize on loading (nn.Linear modules, the head and
    llm_int8_skip_modules aside) is read quantized and dequantized again.
    """
    raw = read_json(file, what="quantization config")
    config = raw.get("quantization_config", raw) if isinstance(raw, dict) else raw
    settings = bnb_settings(config, file)
    check_bnb()
    skip = settings["skip"] or ["lm_head"]
    groups = {}
    for name, info in tensors.items():
        module_name, _, param = name.rpartition(".")
        placement = binder.resolve(module_name)
        if param != "weight" or placement is None or len(info.shape) != 2:
            continue
        linear = placement.module.layout in _LINEAR and placement.layer is not None
        if linear and info.dtype.is_floating_point and not any(key in module_name for key in skip):
            groups[name] = ()
    return with_conv1d(Quantization(settings, "qlora-base", groups), dict(tensors), binder)[0]


def with_conv1d(
    quantization: Quantization, tensors: dict[str, TensorInfo], binder: Binder
) -> tuple[Quantization, dict[str, TensorInfo]]:
    """GPT-2's Conv1D weights are quantized transposed, as [out, in]: shown in their stored [in, out]."""
    flipped = set()
    for name in quantization.groups:
        placement = binder.resolve(name.rpartition(".")[0])
        if placement is not None and placement.module.layout is Layout.CONV1D:
            flipped.add(name)
    if not flipped or quantization.mode == "qlora-base":  # a full-precision base is stored [in, out]
        return replace(quantization, transposed=frozenset(flipped)), tensors
    shown = {n: replace(i, shape=i.shape[::-1]) if n in flipped else i for n, i in tensors.items()}
    return replace(quantization, transposed=frozenset(flipped)), shown


def _groups_4bit(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[str, ...]]:
    """Each packed 4-bit weight with the names of its statistics (`<weight>.absmax`, ...)."""
    weights = {name.partition(_QS)[0] for name in tensors if _QS in name}
    groups: dict[str, list[str]] = {weight: [] for weight in weights}
    for name in tensors:
        head, sep, _ = name.partition(".weight.")
        if sep and head + ".weight" in groups:
            groups[head + ".weight"].append(name)
    return {weight: tuple(parts) for weight, parts in groups.items() if weight in tensors}


def _groups_8bit(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[str, ...]]:
    """Each int8 weight with its row scales (`<module>.SCB`) and its `weight_format`."""
    groups = {}
    for name in tensors:
        if name.endswith(".SCB") and (weight := name.removesuffix(".SCB") + ".weight") in tensors:
            extra = name.removesuffix(".SCB") + ".weight_format"
            groups[weight] = (name, extra) if extra in tensors else (name,)
    return groups


def _logical(
    name: str, info: TensorInfo, parts: tuple[str, ...], read: Read, default: torch.dtype, settings: dict
) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype a packed weight has once dequantized."""
    if settings["bits"] == 8:
        return info.shape, default
    packed = next(part for part in parts if _QS in part)
    state = loads_strict(bytes(read(packed).numpy()), path=info.file, what=f"{packed} (bnb metadata)")
    state = state if isinstance(state, dict) else {}
    shape, dtype = state.get("shape"), getattr(torch, str(state.get("dtype")), None)
    if not isinstance(shape, list) or not isinstance(dtype, torch.dtype):
        raise BadInputError(f"{packed} has no shape or dtype", path=info.file,
                            fix="re-save the quantized base with save_pretrained")  # fmt: skip
    return tuple(int(n) for n in shape), dtype


def _simulate(functional, value: torch.Tensor, settings: dict) -> torch.Tensor:
    """`value` quantized and dequantized by bitsandbytes as transformers loads it, in its dtype."""
    if settings["bits"] == 8:
        codes, scales, _ = functional.int8_vectorwise_quant(value.to(torch.float16))
        return functional.int8_vectorwise_dequant(codes, scales).to(value.dtype)
    packed, state = functional.quantize_4bit(
        value.contiguous(), blocksize=_BLOCKSIZE, compress_statistics=settings["double_quant"],
        quant_type=settings["quant_type"],
    )  # fmt: skip
    state.dtype = _compute_dtype(settings)
    return functional.dequantize_4bit(packed, state)


def _compute_dtype(settings: dict) -> torch.dtype:
    """The dtype bitsandbytes' 4-bit matmul dequantizes into (transformers' default: float32)."""
    return _COMPUTE[settings.get("compute_dtype", "float32")]
