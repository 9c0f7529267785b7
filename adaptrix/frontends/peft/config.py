"""PEFT's adapter_config.json: read, checked, and PEFT's own targeting and scaling rules.

LoRA's fields are listed here; LoHa's, LoKr's, IA3's and VeRA's in peft_kinds_config.py.

PEFT is not imported here: `import peft` takes seconds and hundreds of MB (it imports all of
transformers), which a streaming compile cannot afford. The rules below follow PEFT 0.21's
`check_target_module_exists`, `get_pattern_key` and `LoraLayer.update_layer`; tests check them
against those functions.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from adaptrix.artifacts import PEFT_CONFIG_NAME as CONFIG_NAME
from adaptrix.frontends.peft import patterns
from adaptrix.frontends.peft.kinds_config import KINDS
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["CONFIG_NAME", "MAX_SCALE", "LoraSettings", "read_lora_settings"]

# A scale (alpha / r) beyond this is not a trained adapter but a broken or hostile config: merged,
# it turns float16 weights into inf. Trained LoRAs use 0.1 to a few hundred.
MAX_SCALE = 1e6

# Fields that change what the adapter computes and that Adaptrix cannot honour: refused when set.
_UNSUPPORTED = {
    "layer_replication": "layer replication duplicates base layers",
    "target_parameters": "LoRA on nn.Parameter targets (MoE experts)",
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
    "use_dora", "lora_bias",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """The parts of a LoRA adapter_config.json that decide what the adapter computes."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    target_modules: tuple[str, ...] | str | None
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | int | None
    layers_pattern: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    bias: str
    use_dora: bool
    lora_bias: bool
    fan_in_fan_out: bool
    peft_type: str = "LORA"
    feedforward_modules: tuple[str, ...] | str | None = None  # IA3: the modules whose input is scaled
    projection_prng_key: int = 0  # VeRA: the seed of the shared projections
    save_projection: bool = True  # VeRA: whether the shared projections are in the adapter file
    task_type: str | None = None  # SEQ_CLS lets a saved classifier head come with the adapter

    def rank(self, key: str) -> int:
        """The rank PEFT gives module `key` (rank_pattern first, then r)."""
        return int(self.rank_pattern.get(pattern_key(self.rank_pattern, key), self.r))

    def alpha(self, key: str) -> float:
        """The alpha PEFT gives module `key` (alpha_pattern first, then lora_alpha)."""
        return float(self.alpha_pattern.get(pattern_key(self.alpha_pattern, key), self.lora_alpha))

    def scale(self, key: str) -> float:
        """LoRA's scale for module `key`: alpha / r, or alpha / sqrt(r) with rsLoRA; refused if absurd."""
        rank, alpha = self.rank(key), self.alpha(key)
        if rank <= 0:
            raise BadInputError(
                f"gives module {key!r} rank {rank}; expected a positive integer", path=self.path
            )
        scale = alpha / (math.sqrt(rank) if self.use_rslora else rank)
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise BadInputError(
                f"gives module {key!r} the scale {scale:g} (alpha {alpha:g}, r {rank}); a trained "
                f"adapter's is far below {MAX_SCALE:g}",
                path=self.path,
                fix="fix lora_alpha / alpha_pattern / r in adapter_config.json",
            )
        return scale

    def feedforward(self, key: str) -> bool:
        """IA3: whether PEFT treats module `key` as feedforward (its input is scaled, not its output)."""
        found = self.feedforward_modules
        if not found:
            return False
        if isinstance(found, str):
            return patterns.fullmatch(found, key)
        return any(key.endswith(name) for name in found)

    def saves(self, key: str) -> bool:
        """Whether module `key` lies inside a modules_to_save entry."""
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in self.modules_to_save)

    def targets(self, key: str, is_linear: bool) -> bool:
        """Whether PEFT puts LoRA on module `key` (the module name inside the base model)."""
        if self._excluded(key) or self.saves(key):
            return False
        if self.target_modules is None:
            return False
        if self.target_modules == "all-linear":
            return is_linear
        if isinstance(self.target_modules, str):
            return patterns.fullmatch(self.target_modules, key)
        if key in self.target_modules:
            return True
        found = any(key.endswith(f".{t}") for t in self.target_modules)
        layers = self.layers_to_transform
        if not found or layers is None or (isinstance(layers, tuple) and not layers):
            return found
        index = patterns.layer_index(self.layers_pattern, key)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def _excluded(self, key: str) -> bool:
        excluded = self.exclude_modules
        if not excluded:
            return False
        if isinstance(excluded, str):
            return patterns.fullmatch(excluded, key)
        return key in excluded or any(key.endswith(f".{e}") for e in excluded)


def pattern_key(found: dict, key: str) -> str:
    """PEFT's get_pattern_key: the first pattern that matches the end of `key`, else `key`."""
    return patterns.pattern_key(found, key)


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
            f"peft_type is {_shown(peft_type)}; Adaptrix compiles LORA, {', '.join(KINDS)} adapters",
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
            f"has field {name!r} = {_shown(value)}, unknown to Adaptrix for peft_type {raw.get('peft_type')}",
            path=file,
            fix="remove it if it does not change what the adapter computes",
        )
    allowed = ("none", "all", "vera_only" if raw.get("peft_type") == "VERA" else "lora_only")
    if raw.get("bias", "none") not in allowed:
        raise BadInputError(f"has bias {_shown(raw['bias'])}; expected {', '.join(allowed)}", path=file)


def _unset(value: object) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _settings(raw: dict, file: Path) -> LoraSettings:
    try:
        r, alpha = _integer(raw["r"], "r"), _finite(raw.get("lora_alpha", 8), "lora_alpha")
        if r <= 0:
            raise ValueError("r must be positive")
        return LoraSettings(
            path=file,
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=_patterns(raw.get("rank_pattern"), _integer, "rank_pattern"),
            alpha_pattern=_patterns(raw.get("alpha_pattern"), _finite, "alpha_pattern"),
            target_modules=_strings(raw.get("target_modules"), "target_modules"),
            exclude_modules=_strings(raw.get("exclude_modules"), "exclude_modules"),
            layers_to_transform=_layers(raw.get("layers_to_transform")),
            layers_pattern=_strings(raw.get("layers_pattern"), "layers_pattern", "layer"),
            modules_to_save=_names(raw.get("modules_to_save"), "modules_to_save"),
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
            feedforward_modules=_strings(raw.get("feedforward_modules"), "feedforward_modules"),
            projection_prng_key=_seed(raw.get("projection_prng_key") or 0),
            save_projection=bool(raw.get("save_projection", True)),
        )
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"has an invalid {peft_type} setting ({exc})", path=file) from None


def _strings(value: object, what: str, form: str = "fullmatch") -> tuple[str, ...] | str | None:
    """A module name list, or one regular expression (checked to run in bounded time), or None.

    layers_pattern's strings are patterns in a list too (`form` "layer"): PEFT matches each.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return patterns.check(value, what, form)
    names = _names(value, what)
    if form == "layer":
        for name in names:
            patterns.check(name, what, form)
    return names


def _patterns(value: object, kind, what: str) -> dict:
    """rank_pattern / alpha_pattern: {regular expression: number}, each key checked as PEFT uses it."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{what} must be a mapping of module patterns to numbers, not {type(value).__name__}"
        )
    if len(value) > patterns.MAX_PATTERNS:
        raise ValueError(f"{what} holds {len(value)} patterns, more than {patterns.MAX_PATTERNS}")
    for key in value:
        patterns.check(key, f"{what} key", "key")
    return {key: kind(number, f"{what}[{key!r}]") for key, number in value.items()}


def _seed(value: object) -> int:
    """VeRA's projection_prng_key: an integer torch.Generator.manual_seed takes."""
    seed = _integer(value, "projection_prng_key")
    if not 0 <= seed < 2**64:
        raise ValueError(f"projection_prng_key must be between 0 and 2**64 - 1, not {seed}")
    return seed


def _integer(value: object, what: str) -> int:
    """A JSON integer (7 or 7.0) below 2**53, not a bool or a string."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or abs(value) >= 2**53:
        raise ValueError(f"{what} must be an integer below 2**53, not {_shown(value)}")
    return int(value)


def _finite(value: object, what: str) -> float:
    """A finite JSON number, not a bool or a string ('nan' and 'Infinity' are strings float() reads)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if (
        not number or abs(value) > sys.float_info.max or not math.isfinite(value)
    ):  # float() then can't overflow
        raise ValueError(f"{what} must be a finite number, not {_shown(value)}")
    return float(value)


def _shown(value: object) -> str:
    """A value for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _names(value: object, what: str) -> tuple[str, ...]:
    """A list of module names (strings); anything else is a ValueError naming `what`."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of module names, not {_shown(value)}")
    return tuple(value)


def _layers(value: object) -> tuple[int, ...] | int | None:
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)
