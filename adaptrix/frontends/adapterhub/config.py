"""AdapterHub adapter_config.json: the methods an adapter holds, each option checked.

Every option either compiles to what `adapters` 1.x computes in eval mode or is refused with a
line naming it. Options that only act in training (dropout, stochastic_depth, init_weights, ...)
are accepted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adaptrix.artifacts import PEFT_CONFIG_NAME as CONFIG_NAME
from adaptrix.frontends.peft.settings import MAX_SCALE
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["BnSettings", "HubConfig", "LoraSettings", "read_hub_config"]

logger = logging.getLogger(__name__)


_BN_DEFAULTS = {
    "original_ln_before": False,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "scaling": 1.0,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "cross_adapter": False,
    "leave_out": [],
    "phm_layer": False,
}
_BN_TRAINING = {
    "init_weights",
    "init_weights_seed",
    "dropout",
    "stochastic_depth",
    "inv_adapter_reduction_factor",
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
}
_BN_KEYS = {"mh_adapter", "output_adapter", "reduction_factor", "non_linearity", *_BN_DEFAULTS, *_BN_TRAINING}
_LORA_KEYS = {
    "architecture",
    "selfattn_lora",
    "intermediate_lora",
    "output_lora",
    "leave_out",
    "r",
    "alpha",
    "dropout",
    "attn_matrices",
    "composition_mode",
    "init_weights",
    "init_weights_seed",
    "use_gating",
    "use_dora",
    "dtype",
    "vera_b",
    "vera_d",
}
# What a refused option is, for the message.
_REFUSED = {
    "phm_layer": "phm_layer (Compacter's hypercomplex layers)",
    "use_gating": "use_gating (UniPELT gates)",
    "inv_adapter": "inv_adapter (invertible adapters)",
    "use_dora": "use_dora (AdapterHub DoRA)",
}
_ARCHITECTURES = {
    "prefix_tuning": "prefix tuning",
    "prompt_tuning": "prompt tuning",
    "reft": "ReFT",
    "mtl_lora": "multi-task LoRA",
}


@dataclass(frozen=True, slots=True)
class BnSettings:
    """A bottleneck config (SeqBn, DoubleSeqBn, ParBn or a custom BnConfig)."""

    values: Mapping[str, object]

    def __getitem__(self, key: str) -> object:
        """An option's value, or AdapterHub's default."""
        return self.values.get(key, _BN_DEFAULTS.get(key))

    def reduction_factor(self, layer: int) -> float:
        """The reduction factor of one layer (a mapping gives per-layer values and a default)."""
        factor = self.values["reduction_factor"]
        if isinstance(factor, Mapping):
            factor = factor.get(str(layer), factor.get("default"))
        return float(factor)


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """A LoRA config (composition_mode add) or IA3 (composition_mode scale)."""

    values: Mapping[str, object]

    @property
    def is_ia3(self) -> bool:
        """IA3: the output scaled by lora_B instead of added to."""
        return self.values.get("composition_mode", "add") == "scale"

    @property
    def scale(self) -> float:
        """Alpha / r, as AdapterHub computes its scaling."""
        return float(self.values.get("alpha", 8)) / float(self.values.get("r", 8))


@dataclass(frozen=True, slots=True)
class HubConfig:
    """An adapter_config.json: the adapter's name, model type, hidden size and methods."""

    path: Path
    name: str
    model_type: str
    hidden_size: int | None
    bottleneck: BnSettings | None
    lora: LoraSettings | None


def read_hub_config(folder: Path) -> HubConfig:
    """Read and check an AdapterHub adapter_config.json."""
    file = folder / CONFIG_NAME
    raw = read_json(file, what="JSON")
    try:
        config, name, model_type = raw["config"], str(raw["name"]), str(raw["model_type"])
    except (KeyError, TypeError) as exc:
        raise BadInputError(
            f"is not an AdapterHub adapter config ({exc!r})",
            path=file,
            fix="re-save the adapter with model.save_adapter(dir, name)",
        ) from None
    if not isinstance(config, dict):
        raise BadInputError("has a config that is not a mapping", path=file,
                            fix="re-save the adapter with model.save_adapter(dir, name)")  # fmt: skip
    methods = config.get("configs") if config.get("architecture") == "union" else [config]
    if not isinstance(methods, list) or not all(isinstance(m, dict) for m in methods):
        raise BadInputError("has a union whose configs are not a list of mappings", path=file)
    bottleneck = lora = None
    for method in methods:
        architecture = method.get("architecture")
        if architecture is not None and not isinstance(architecture, str):
            raise BadInputError(f"has architecture {architecture!r}, not a name", path=file)
        if architecture in _ARCHITECTURES:
            raise UnsupportedError(
                f"holds a {_ARCHITECTURES[architecture]} adapter (architecture "
                f"{architecture!r}), which Adaptrix does not compile",
                path=file,
                fix="use AdapterHub directly for it",
            )
        if architecture == "lora":
            if lora is not None:
                raise UnsupportedError("holds two LoRA configs in one union", path=file)
            lora = LoraSettings(_checked(method, _LORA_KEYS, file))
        elif architecture is None:
            if bottleneck is not None:
                raise UnsupportedError("holds two bottleneck configs in one union", path=file)
            bottleneck = BnSettings(_checked(method, _BN_KEYS, file))
        else:
            raise UnsupportedError(f"has architecture {architecture!r}, unknown to Adaptrix", path=file)
    hidden = raw.get("hidden_size")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise BadInputError(f"has hidden_size {hidden!r}; expected a positive integer", path=file,
                            fix="re-save the adapter with model.save_adapter(dir, name)")  # fmt: skip
    return HubConfig(file, name, model_type, hidden, bottleneck, lora)


def _check_scale(scale: float, what: str, file: Path) -> None:
    """Refuse a scale no trained adapter has (it would merge to inf)."""
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise BadInputError(f"has {what} = {scale:g}; a trained adapter's is far below {MAX_SCALE:g}",
                            path=file, fix="fix the scale in adapter_config.json")  # fmt: skip


def _is_number(value: object) -> bool:
    """A finite JSON number (an integer too large for a float is not: compared before converted)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and abs(value) < 1e300 and math.isfinite(value)


def _positive_factor(value: object) -> bool:
    if isinstance(value, Mapping):
        return bool(value) and all(_positive_factor(v) for v in value.values())
    return _is_number(value) and value > 0


# The value each option must have (a value of another type is an error naming the option).
_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "reduction_factor": ("a positive number or a mapping of layers to one", _positive_factor),
    "r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31),
    "alpha": ("a number", _is_number),
    "dropout": ("a number", _is_number),
    "non_linearity": ("an activation name", lambda v: isinstance(v, str)),
    "composition_mode": ("add or scale", lambda v: v in ("add", "scale")),
    "residual_before_ln": ("true, false or 'post_add'", lambda v: v in (True, False, "post_add")),
    "leave_out": ("a list of layer numbers", lambda v: isinstance(v, list)
                  and all(isinstance(i, int) and not isinstance(i, bool) for i in v)),
    "attn_matrices": ("a list of q, k, v", lambda v: isinstance(v, list)
                      and all(isinstance(m, str) for m in v)),
    **{key: ("true or false", lambda v: isinstance(v, bool))
       for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                   "ln_after", "is_parallel", "selfattn_lora", "intermediate_lora", "output_lora",
                   "adapter_residual_before_ln")},
}  # fmt: skip


def _checked(method: Mapping[str, object], known: set[str], file: Path) -> dict[str, object]:
    """The method's options, with every refused one an error and unknown ones logged."""
    for key, (what, fits) in _TYPES.items():
        if key in method and method[key] is not None and not fits(method[key]):
            raise BadInputError(f"has {key} = {method[key]!r}; expected {what}", path=file,
                                fix="re-save the adapter with model.save_adapter(dir, name)")  # fmt: skip
    if method.get("reduction_factor", 1) is None:
        raise BadInputError("has reduction_factor null; expected a positive number", path=file)
    for key, what in _REFUSED.items():
        if method.get(key):
            raise UnsupportedError(
                f"sets {what}, which Adaptrix does not compile",
                path=file,
                fix=f"retrain without {key}, or use AdapterHub directly",
            )
    if "composition_mode" in method and method["composition_mode"] not in ("add", "scale"):
        raise UnsupportedError(f"has composition_mode {method['composition_mode']!r}", path=file)
    if method.get("vera_d") is not None or method.get("vera_b") is not None:
        raise UnsupportedError(
            "is an AdapterHub VeRA adapter (vera_b / vera_d), which Adaptrix does not compile",
            path=file,
            fix="use AdapterHub directly",
        )
    scaling = method.get("scaling", 1.0)
    if not _is_number(scaling) and scaling not in ("learned", "channel"):
        raise BadInputError(
            f"has scaling {scaling!r}; AdapterHub knows a number, 'learned' or 'channel'", path=file
        )
    _check_scale(scaling if _is_number(scaling) else 1.0, "scaling", file)
    rank, alpha = method.get("r", 8), method.get("alpha", 8)
    if method.get("architecture") == "lora" and _is_number(rank) and _is_number(alpha) and rank > 0:
        _check_scale(alpha / rank, "alpha / r", file)
    for key in method:
        if key not in known:
            logger.warning(
                "%s: option %s is not an AdapterHub option Adaptrix knows; it has no effect", file, key
            )
    return dict(method)
