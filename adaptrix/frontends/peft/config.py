"""PEFT's adapter_config.json: read and checked; anything Adaptrix cannot honour is an error.

LoRA's fields are listed here; LoHa's, LoKr's, IA3's and VeRA's in kinds_config.py. What the
settings mean (targeting, ranks, scales) is settings.py; each field's value is checked by
config_values.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from adaptrix.artifacts import PEFT_CONFIG_NAME as CONFIG_NAME
from adaptrix.frontends.peft.config_values import (
    finite,
    integer,
    layer_indices,
    module_names,
    pattern_numbers,
    prng_seed,
    selector,
    shown,
)
from adaptrix.frontends.peft.kinds_config import KINDS
from adaptrix.frontends.peft.settings import LoraSettings
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["CONFIG_NAME", "read_lora_settings"]


# Fields that change what the adapter computes and that Adaptrix cannot honour: refused when set.
_UNSUPPORTED = {
    "layer_replication": "layer replication duplicates base layers",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA depends on the input tokens and cannot be merged",
    "use_qalora": "QA-LoRA pools the input groupwise",
    "megatron_config": "Megatron-parallel LoRA layers",
    "arrow_config": "Arrow routing among several LoRA experts",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# Fields that only matter while training or initialising, or that are described by the tensors.
_HARMLESS = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "peft_version", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying", "fan_in_fan_out", "peft_type",
}  # fmt: skip
_SUPPORTED = {
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "bias",
    "use_dora", "lora_bias", "target_parameters",
}  # fmt: skip


def read_lora_settings(adapter: Path) -> LoraSettings:
    """Read and check a PEFT adapter_config.json; anything Adaptrix cannot honour is an error."""
    file = adapter / CONFIG_NAME
    if not file.is_file():
        raise BadInputError(
            f"has no {CONFIG_NAME}",
            path=adapter,
            fix="pass a PEFT adapter directory (save_pretrained)",
        )
    raw = read_json(file, what="JSON")
    if not isinstance(raw, dict):
        raise BadInputError("is not a JSON object", path=file, fix="re-save the adapter")
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or (peft_type != "LORA" and peft_type not in KINDS):
        raise UnsupportedError(
            f"peft_type is {shown(peft_type)}; Adaptrix compiles LORA, {', '.join(KINDS)} adapters",
            path=file,
            fix="use PEFT directly for this adapter",
        )
    if peft_type == "LORA":
        _check_fields(raw, file, _SUPPORTED | _HARMLESS)
        return _settings(raw, file)
    _check_fields(raw, file, KINDS[peft_type].supported | KINDS[peft_type].harmless)
    return _kind_settings(raw, file, peft_type)


def _check_fields(raw: dict, file: Path, known: set[str] | frozenset[str]) -> None:
    for name, value in raw.items():
        if name in known or _unset(value):
            continue
        if name in _UNSUPPORTED:
            raise UnsupportedError(
                f"sets {name} ({_UNSUPPORTED[name]}), which Adaptrix cannot compile exactly",
                path=file,
                fix="use PEFT's own forward for this adapter",
            )
        raise UnsupportedError(
            f"has field {name!r} = {shown(value)}, unknown to Adaptrix for peft_type {raw.get('peft_type')}",
            path=file,
            fix="remove it if it does not change what the adapter computes",
        )
    allowed = ("none", "all", "vera_only" if raw.get("peft_type") == "VERA" else "lora_only")
    if raw.get("bias", "none") not in allowed:
        raise BadInputError(f"has bias {shown(raw['bias'])}; expected {', '.join(allowed)}", path=file)


def _unset(value: object) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _settings(raw: dict, file: Path) -> LoraSettings:
    try:
        r, alpha = integer(raw["r"], "r"), finite(raw.get("lora_alpha", 8), "lora_alpha")
        if r <= 0:
            raise ValueError("r must be positive")
        return LoraSettings(
            path=file,
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=pattern_numbers(raw.get("rank_pattern"), integer, "rank_pattern"),
            alpha_pattern=pattern_numbers(raw.get("alpha_pattern"), finite, "alpha_pattern"),
            target_modules=selector(raw.get("target_modules"), "target_modules"),
            target_parameters=module_names(raw.get("target_parameters"), "target_parameters"),
            exclude_modules=selector(raw.get("exclude_modules"), "exclude_modules"),
            layers_to_transform=layer_indices(raw.get("layers_to_transform")),
            layers_pattern=selector(raw.get("layers_pattern"), "layers_pattern", "layer"),
            modules_to_save=module_names(raw.get("modules_to_save"), "modules_to_save"),
            bias=str(raw.get("bias", "none")),
            use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            task_type=raw.get("task_type") if isinstance(raw.get("task_type"), str) else None,
        )
    except (KeyError, TypeError, ValueError, re.error) as exc:
        raise BadInputError(f"has an invalid LoRA setting ({exc})", path=file) from None


def _kind_settings(raw: dict, file: Path, peft_type: str) -> LoraSettings:
    """LoHa, LoKr, IA3, VeRA: the settings in LoRA's terms (scale alpha / r; IA3 and VeRA: 1)."""
    fields = KINDS[peft_type]
    lora = {"peft_type": peft_type, "r": raw.get("r", 1) if fields.has_rank else 1}
    lora["lora_alpha"] = raw.get(fields.alpha_field, 8) if fields.alpha_field else lora["r"]
    settings = _settings({**raw, **lora, "use_rslora": False, "use_dora": False, "lora_bias": False}, file)
    try:
        return dataclasses.replace(
            settings,
            peft_type=peft_type,
            feedforward_modules=selector(raw.get("feedforward_modules"), "feedforward_modules"),
            projection_prng_key=prng_seed(raw.get("projection_prng_key") or 0),
            save_projection=bool(raw.get("save_projection", True)),
        )
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"has an invalid {peft_type} setting ({exc})", path=file) from None
