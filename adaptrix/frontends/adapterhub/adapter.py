"""AdapterHub frontend: a `save_adapter` directory (adapter_config.json + weights) -> AdapterIR.

Bottleneck configs (SeqBn, DoubleSeqBn, ParBn, custom BnConfig) become `Bottleneck` ops at the
attention block (mh_adapter, site attn_o) or the FFN (output_adapter, site mlp_down); LoRA
becomes `LowRank` (delta = alpha / r * B @ A), IA3 (LoRA with composition_mode scale) a `Scale`
of the output; a ConfigUnion both. Tensors that share storage in the file stay shared.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from adaptrix.binders.table import Layout
from adaptrix.frontends.adapterhub.config import CONFIG_NAME, HubConfig, read_hub_config
from adaptrix.frontends.adapterhub.lower import lower_bottlenecks
from adaptrix.frontends.peft.weights import _load_bin
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.safetensors_io import read_header, read_tensor
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, LazyTensor, LowRank, Op, Scale, Site

__all__ = ["HubAdapter", "is_adapterhub", "lower_adapterhub", "read_adapterhub"]

logger = logging.getLogger(__name__)

BIN_NAME = "pytorch_adapter.bin"
SAFETENSORS_NAME = "adapter.safetensors"
FUSION_NAME = "adapter_fusion_config.json"
HEAD_FILES = ("pytorch_model_head.bin", "model_head.safetensors", "head_config.json")


@dataclass(frozen=True, slots=True)
class HubAdapter:
    """An AdapterHub adapter directory: its config and its tensors by saved name (lazy)."""

    path: Path
    config: HubConfig
    weights_file: Path
    tensors: dict[str, LazyTensor]

    def files(self) -> list[Path]:
        """The files the adapter was read from."""
        return [self.config.path, self.weights_file]


def is_adapterhub(path: Path) -> bool:
    """A directory AdapterHub's save_adapter (or save_adapter_fusion) wrote."""
    weights = any((path / name).is_file() for name in (BIN_NAME, SAFETENSORS_NAME))
    return (path / FUSION_NAME).is_file() or ((path / CONFIG_NAME).is_file() and weights)


def read_adapterhub(adapter: Path | str) -> HubAdapter:
    """Read an AdapterHub adapter directory: config checked, tensors indexed (not yet loaded)."""
    path = Path(adapter)
    if (path / FUSION_NAME).is_file():
        raise UnsupportedError(
            "holds an AdapterFusion layer, which Adaptrix does not compile",
            path=path,
            fix="compile the fused adapters one at a time, or use AdapterHub directly",
        )
    config = read_hub_config(path)
    if (path / SAFETENSORS_NAME).is_file():
        file = path / SAFETENSORS_NAME
        infos, _ = read_header(file)
        tensors = {
            name: LazyTensor(
                info.shape, f"{file}:{name}", partial(read_tensor, file, name), info.dtype.itemsize
            )
            for name, info in infos.items()
        }
    else:
        file = path / BIN_NAME
        tensors = _shared_lazy(_load_bin(file), file)
    for extra in HEAD_FILES:
        if (path / extra).is_file():
            logger.info("%s: %s is the model's prediction head, not part of the adapter", path, extra)
    if not tensors:
        raise BadInputError("holds no tensors", path=file, fix="re-save the adapter")
    return HubAdapter(path, config, file, tensors)


def _shared_lazy(state: dict[str, torch.Tensor], file: Path) -> dict[str, LazyTensor]:
    """Lazy tensors; names whose tensors share storage (weights shared across layers) share one."""
    seen: dict[tuple, LazyTensor] = {}
    found = {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if key not in seen:
            seen[key] = LazyTensor.of(value, f"{file}:{name}")
        found[name] = seen[key]
    return found


def lower_adapterhub(adapter: HubAdapter, base: Checkpoint) -> AdapterIR:
    """Lower a read AdapterHub adapter onto a base."""
    config, file = adapter.config, adapter.weights_file
    if config.model_type != base.source.arch:
        raise BadInputError(
            f"was saved from a {config.model_type} model, the base is {base.source.arch}",
            path=config.path,
            fix="use the base the adapter was trained on",
        )
    if config.hidden_size is not None and config.hidden_size != base.source.hidden_size:
        raise BadInputError(
            f"was made for hidden size {config.hidden_size}, the base has {base.source.hidden_size}",
            path=config.path,
            fix="use the base it was trained on",
        )
    name = re.escape(config.name)
    lora_re = re.compile(rf"(?P<module>.+)\.loras\.{name}\.(?P<param>.+)")
    container = re.escape(base.binder.layer_container)
    bottleneck_re = re.compile(
        rf"(?:.*\.)?{container}\.(?P<layer>\d+)\.(?P<loc>.+)\.adapters\.{name}\.(?P<param>.+)"
    )
    lora: dict[str, dict[str, LazyTensor]] = {}
    bottleneck: dict[tuple[int, str], dict[str, LazyTensor]] = {}
    for key, tensor in adapter.tensors.items():
        if (match := lora_re.fullmatch(key)) and config.lora is not None:
            lora.setdefault(match.group("module"), {})[match.group("param")] = tensor
        elif (match := bottleneck_re.fullmatch(key)) and config.bottleneck is not None:
            where = (int(match.group("layer")), match.group("loc"))
            bottleneck.setdefault(where, {})[match.group("param")] = tensor
        else:
            raise BadInputError(
                f"holds tensor {key!r}, which is not part of the adapter {config.name!r} that "
                "adapter_config.json describes",
                path=file,
                fix="re-save the adapter",
            )
    ops: list[tuple[Site, Op]] = []
    if config.lora is not None:
        ops += _lora_ops(adapter, base, lora)
    if config.bottleneck is not None:
        ops += lower_bottlenecks(config.bottleneck, bottleneck, base, file)
    return AdapterIR(tuple(ops), base.source, name=adapter.path.name)


def _lora_ops(adapter: HubAdapter, base: Checkpoint, modules: dict) -> list[tuple[Site, Op]]:
    settings, file = adapter.config.lora, adapter.weights_file
    if not modules:
        raise BadInputError("has a LoRA config but no LoRA weights", path=file, fix="re-save the adapter")
    ops: list[tuple[Site, Op]] = []
    for module, params in modules.items():
        placement = base.binder.resolve(module)
        info = base.info(f"{module}.weight")
        if placement is None or info is None or placement.module.layout is not Layout.LINEAR:
            raise BadInputError(
                f"has LoRA weights for {module!r}, which is no linear module of the base",
                path=file,
                fix="use the base the adapter was trained on",
            )
        if placement.module.split is not None:
            raise UnsupportedError(f"has LoRA on the fused module {module!r}", path=file)
        wanted = {"lora_B"} if settings.is_ia3 else {"lora_A", "lora_B"}
        if set(params) != wanted:
            raise BadInputError(f"has {sorted(params)} for {module!r}, expected {sorted(wanted)}", path=file)
        out_rows, in_cols = info.shape
        a, b = params.get("lora_A"), params["lora_B"]
        site = Site(placement.layer, placement.module.roles[0])
        if settings.is_ia3:  # AdapterHub's IA3: output * (lora_B * alpha / r), lora_B [out, 1]
            if b.shape != (out_rows, 1):
                raise BadInputError(
                    f"{b.origin} has shape {list(b.shape)}, expected [{out_rows}, 1]", path=file
                )
            scale = settings.scale
            ops.append((site, Scale(b.map(lambda t, s=scale: t.reshape(-1) * s, (out_rows,)), "out")))
            continue
        rank = int(settings.values.get("r", 8))
        if a.shape != (rank, in_cols) or b.shape != (out_rows, rank):
            raise BadInputError(
                f"LoRA of {module!r} has shapes {list(a.shape)} / {list(b.shape)}, the base and "
                f"r={rank} need {[rank, in_cols]} / {[out_rows, rank]}",
                path=file,
            )
        ops.append((site, LowRank(a, b, settings.scale)))
    return ops
