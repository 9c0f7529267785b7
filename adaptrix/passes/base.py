"""The pass contract: `run(ir, options) -> PassResult(ir, changed, report)`, with typed options."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import AdapterIR

__all__ = ["Pass", "PassResult", "parse_options", "rebuild"]


@dataclass(frozen=True, slots=True)
class PassResult:
    """What a pass made: the new IR, whether anything changed, and a JSON-able report."""

    ir: AdapterIR
    changed: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pass:
    """A named IR -> IR rewrite with a frozen dataclass of options.

    `run(ir, options)` takes one IR; a pass with `several` set (combine) takes a sequence of
    IRs instead and makes one from them. A pass with `uses_base` set (redistribute, project) is
    called as `run(ir, options, base)` with the Checkpoint of the base being compiled for; its
    input IR may be in other dimensions than the base's (an AIR adapter made for another model).
    Only a pass with `bottlenecks` set (fuse-hybrid) takes IRs holding Bottleneck ops. A pass
    with `roles` set (project, fuse-hybrid) needs semantic roles: module roles are refused. Where a pass
    cannot take an encoder-decoder (adapter or base), `no_encoder_decoder` says why: it is refused.
    """

    name: str
    summary: str
    options: type
    run: Callable[..., PassResult]
    several: bool = False
    uses_base: bool = False
    bottlenecks: bool = False
    roles: bool = False
    no_encoder_decoder: str = ""


def parse_options(spec: Pass, text: str) -> Any:
    """Parse `key=value,key=value` into the pass's options; list values go on after commas (`w=1,2`)."""
    values: dict[str, str] = {}
    last: str | None = None
    for token in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in token:
            if last is None:
                raise BadInputError(f"pass {spec.name}: option {token!r} is not key=value")
            values[last] += "," + token
            continue
        key, _, value = token.partition("=")
        key, last = key.strip(), key.strip()
        if key in values:
            raise BadInputError(f"pass {spec.name}: option {key} is given twice")
        values[key] = value.strip()
    hints = typing.get_type_hints(spec.options)
    known = {f.name: f for f in dataclasses.fields(spec.options)}
    for key in values:
        if key not in known:
            raise BadInputError(f"pass {spec.name}: unknown option {key!r}",
                                fix=f"it takes: {', '.join(known) or 'no options'}")  # fmt: skip
    missing = [name for name, f in known.items() if name not in values and _required(f)]
    if missing:
        raise BadInputError(f"pass {spec.name}: option {missing[0]} is required")
    parsed = {key: _convert(spec.name, key, value, hints[key]) for key, value in values.items()}
    try:
        return spec.options(**parsed)
    except ValueError as exc:
        raise BadInputError(f"pass {spec.name}: {exc}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(pass_name: str, key: str, text: str, hint: object) -> object:
    """One option's text as its annotated type: int, float, str, bool, a tuple of them, or X | None."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(hint)
    try:
        if typing.get_origin(hint) is tuple:
            return tuple(_finite(args[0](item)) for item in text.split(","))
        if "," in text:
            raise ValueError("one value expected")
        if hint is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return _finite(hint(text))  # type: ignore[operator]
    except KeyError:
        raise BadInputError(f"pass {pass_name}: option {key}={text!r} is not true or false") from None
    except ValueError:
        item = args[0] if args else hint
        name = {int: "integer", float: "number", str: "string"}.get(item, str(item))  # type: ignore[call-overload]
        kind = f"a comma-separated list of {name}s" if args else f"a single {name}"
        raise BadInputError(f"pass {pass_name}: option {key}={text!r} is not {kind}") from None


def _finite(value: object) -> object:
    """The value, unless it is a NaN or infinite float."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not finite")
    return value


def rebuild(ir: AdapterIR, ops: Sequence) -> AdapterIR:
    """The IR with its ops replaced, the rest kept."""
    return dataclasses.replace(ir, ops=tuple(ops))
