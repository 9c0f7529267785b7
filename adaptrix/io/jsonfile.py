"""Strict JSON for every file Adaptrix reads: finite numbers, bounded size and depth, one-line errors.

Python's json accepts `NaN`, `Infinity` and `1e400` (read as inf) and recurses once per nesting
level; an adapter config, a manifest or a safetensors header is untrusted input, so each of
those is refused here with the file named. Standard library only: the serving-time runtime
(`adaptrix.runtimes.hooks`) uses it too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adaptrix.ir.errors import BadInputError

__all__ = ["MAX_DEPTH", "MAX_JSON_BYTES", "loads_strict", "read_bounded", "read_json"]

MAX_JSON_BYTES = 64 << 20  # a config, manifest or index; safetensors headers have their own bound
MAX_DEPTH = 64  # PEFT, transformers and Adaptrix files nest a few levels


class _NotFiniteError(ValueError):
    """A number JSON may spell but a model file must not hold."""


def _constant(text: str) -> float:
    raise _NotFiniteError(f"holds {text}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFiniteError(f"holds {text}, which is not a finite number")
    return value


def _depth(value: Any) -> int:
    """The nesting depth of a parsed value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def loads_strict(text: str | bytes, *, path: object | None = None, what: str = "JSON") -> Any:
    """Parse JSON text, refusing non-finite numbers, over-deep nesting and malformed text."""
    fix = f"the {what} is malformed or was tampered with; restore or re-create it"
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite_float)
    except _NotFiniteError as exc:
        raise BadInputError(f"is not valid {what}: it {exc}", path=path, fix=fix) from None
    except RecursionError:
        raise BadInputError(f"is not valid {what}: nested too deeply", path=path, fix=fix) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError; so are huge ints
        reason = " ".join(str(exc).split())[:200]
        raise BadInputError(f"is not valid {what} ({reason})", path=path, fix=fix) from None
    if _depth(value) > MAX_DEPTH:
        raise BadInputError(f"is not valid {what}: nested deeper than {MAX_DEPTH} levels", path=path, fix=fix)
    return value


def read_json(path: Path | str, *, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and strictly parse a JSON file no larger than `max_bytes`, with errors naming the file."""
    return loads_strict(read_bounded(path, what=what, max_bytes=max_bytes), path=Path(path), what=what)


def read_bounded(path: Path | str, *, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """A JSON file's bytes, read once and refused past `max_bytes` (for a caller that also hashes them)."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except IsADirectoryError:
        raise BadInputError("is a directory, not a JSON file", path=file) from None
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror or exc})", path=file) from None
    if len(data) > max_bytes:
        raise BadInputError(f"is larger than {max_bytes} bytes, too large for a {what}", path=file,
                            fix="give the file Adaptrix or the library wrote, not another")  # fmt: skip
    return data
