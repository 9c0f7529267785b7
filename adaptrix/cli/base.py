"""The command line's shared parts: the typer app, its consoles, and one way to call the API."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from typer.exceptions import TyperException

from adaptrix.artifacts import ADAPTRIX_VERSION
from adaptrix.cli.errors import INPUT_ERRORS, describe
from adaptrix.ir.errors import AdaptrixError

__all__ = ["app", "call", "cell", "err", "out"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: typer's rich panels show a `<bool>` value after every flag
    help="Adaptrix: compile model adapters into merged models, hook bundles and ONNX.",
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}
T = TypeVar("T")


def call(action: Callable[[], T], writing: Path | None = None) -> T:
    """Run an API call; any error becomes one line on stderr and exit 2 (1 for parity), no traceback.

    An OSError names its file (or `writing`, the output, when the system names none) and what to
    do; another error names its kind. `--debug` prints the traceback as well.
    """
    _quiet_loading()
    try:
        return action()
    except (typer.Exit, typer.Abort, TyperException):  # the CLI's own exits, not errors
        raise
    except AdaptrixError as exc:
        _fail(exc.line(), exc.exit_code)
    except INPUT_ERRORS as exc:
        _fail(describe(exc, writing), 2)
    except Exception as exc:  # the last resort: one line, never a traceback
        _fail(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}; this may be a bug in "
              "Adaptrix: rerun with --debug and report the traceback", 2)  # fmt: skip


def _quiet_loading() -> None:
    """No progress bar per model transformers loads (transformers 5 draws one on stderr)."""
    from huggingface_hub.utils import disable_progress_bars  # transformers reads it when imported

    disable_progress_bars()
    loaded = sys.modules.get("transformers.utils.logging")
    if loaded is not None:  # imported already (the Python API, tests): it read the setting then
        loaded.disable_progress_bar()


def _fail(line: str, code: int) -> NoReturn:
    """Print `line` as the error (after the traceback at --debug) and exit with `code`."""
    if _state["debug"]:
        traceback.print_exc()
    err.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _print_version(value: bool) -> None:
    if value:
        out.print(ADAPTRIX_VERSION, markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cell(value: object) -> str:
    """A table cell: `-` for none, a shape as 2x3, floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, list):  # a shape
        return "x".join(map(str, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)
