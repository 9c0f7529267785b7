r"""Regular expressions from adapter configs, matched in bounded time with PEFT's semantics.

PEFT matches `target_modules` (a string), `exclude_modules`, `rank_pattern`, `alpha_pattern`,
`layers_pattern` and IA3's `feedforward_modules` with Python's `re`, a backtracking engine: a
pattern such as `(.+)+Z` takes exponential time on a module name. Here each pattern is matched
with RE2 (google-re2), whose time is linear in the name, in exactly the forms PEFT 0.21 uses
(`re.fullmatch(p, key)`; `re.match(rf"(.*\.)?({p})$", key)`;
`re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)`). A pattern RE2 cannot run (backreferences,
lookaround: features that need backtracking) is refused, as is one that Python's `re` refuses
(PEFT would fail on it), and one too long. Where the engines differ, module names decide: RE2's
`$` never matches before a final newline and its `\d \w \s \b` are ASCII, so the results are
Python's for printable ASCII names (tensor names with control characters are refused on reading).
"""

from __future__ import annotations

import functools
import re

import re2

__all__ = ["MAX_PATTERNS", "MAX_PATTERN_CHARS", "check", "fullmatch", "layer_index", "pattern_key"]

MAX_PATTERN_CHARS = 2000  # a long alternation of module names fits; a pattern is not a program
MAX_PATTERNS = 2048  # keys of one rank_pattern / alpha_pattern: one per module of a 400B model fits

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print its own parse errors to stderr


def _key_form(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"


def _layer_form(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


_FORMS = {"fullmatch": lambda p: p, "key": _key_form, "layer": _layer_form}


@functools.lru_cache(maxsize=8192)
def _compiled(text: str) -> re2._Regexp:
    """The RE2 program of a pattern already checked by `check`."""
    return re2.compile(text, _OPTIONS)


def check(pattern: str, what: str, form: str = "fullmatch") -> str:
    """Refuse (ValueError naming `what`) a pattern PEFT's `re` rejects or RE2 cannot run; return it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is a pattern of {len(pattern)} characters, longer than {MAX_PATTERN_CHARS}")
    text = _FORMS[form](pattern)
    try:
        re.compile(text)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None
    try:
        _compiled(text)
    except re2.error:
        raise ValueError(
            f"{what} {pattern!r} uses a regular-expression feature (backreference, lookaround, "
            "possessive or atomic group) that cannot be matched in bounded time; write it without, "
            "or list the module names"
        ) from None
    return pattern


def fullmatch(pattern: str, key: str) -> bool:
    """PEFT's `re.fullmatch(pattern, key)`, for target_modules, exclude_modules, feedforward_modules."""
    return _compiled(pattern).fullmatch(key) is not None


def pattern_key(patterns: dict, key: str) -> str:
    """PEFT's get_pattern_key: the first pattern that matches the end of `key`, else `key`."""
    for pattern in patterns:
        if _compiled(_key_form(pattern)).match(key) is not None:
            return pattern
    return key


def layer_index(patterns: tuple[str, ...] | str | None, key: str) -> int | None:
    """The layer number PEFT reads from `key` for layers_to_transform (None: no layer found)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            match = _compiled(_layer_form(pattern)).match(key)
            if match is not None:
                break
    index = match.group("idx") if match else None  # a top-level | may match without the group
    return None if index is None else int(index)
