"""The values of adapter_config.json's fields, checked: integers, finite numbers, module names, patterns.

Each raises ValueError naming the field; read_lora_settings turns it into a BadInputError.
"""

from __future__ import annotations

import math
import sys

from adaptrix.frontends.peft import patterns

__all__ = [
    "finite",
    "integer",
    "layer_indices",
    "module_names",
    "pattern_numbers",
    "prng_seed",
    "selector",
    "shown",
]


def selector(value: object, what: str, form: str = "fullmatch") -> tuple[str, ...] | str | None:
    """A module name list, or one regular expression (checked to run in bounded time), or None.

    layers_pattern's strings are patterns in a list too (`form` "layer"): PEFT matches each.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return patterns.check(value, what, form)
    names = module_names(value, what)
    if form == "layer":
        for name in names:
            patterns.check(name, what, form)
    return names


def pattern_numbers(value: object, kind, what: str) -> dict:
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


def prng_seed(value: object) -> int:
    """VeRA's projection_prng_key: an integer torch.Generator.manual_seed takes."""
    seed = integer(value, "projection_prng_key")
    if not 0 <= seed < 2**64:
        raise ValueError(f"projection_prng_key must be between 0 and 2**64 - 1, not {seed}")
    return seed


def integer(value: object, what: str) -> int:
    """A JSON integer (7 or 7.0) below 2**53, not a bool or a string."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or abs(value) >= 2**53:
        raise ValueError(f"{what} must be an integer below 2**53, not {shown(value)}")
    return int(value)


def finite(value: object, what: str) -> float:
    """A finite JSON number, not a bool or a string ('nan' and 'Infinity' are strings float() reads)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if (
        not number or abs(value) > sys.float_info.max or not math.isfinite(value)
    ):  # float() then can't overflow
        raise ValueError(f"{what} must be a finite number, not {shown(value)}")
    return float(value)


def shown(value: object) -> str:
    """A value for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def module_names(value: object, what: str) -> tuple[str, ...]:
    """A list of module names (strings); anything else is a ValueError naming `what`."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of module names, not {shown(value)}")
    return tuple(value)


def layer_indices(value: object) -> tuple[int, ...] | int | None:
    """layers_to_transform: None, one layer index, or a tuple of them."""
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)
