"""The `adaptrix` command: parses options, calls the API, prints. The work lives in the API."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from adaptrix import __version__
from adaptrix.cli_errors import INPUT_ERRORS, describe
from adaptrix.cli_progress import CompileProgress
from adaptrix.toolchain.errors import AdaptrixError, BadInputError

__all__ = ["app", "main"]

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


def _run(action: Callable[[], T], writing: Path | None = None) -> T:
    """Run an API call; any error becomes one line on stderr and exit 2 (1 for parity), no traceback.

    An OSError names its file (or `writing`, the output, when the system names none) and what to
    do; another error names its kind. `--debug` prints the traceback as well.
    """
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


def _fail(line: str, code: int) -> NoReturn:
    """Print `line` as the error (after the traceback at --debug) and exit with `code`."""
    if _state["debug"]:
        traceback.print_exc()
    err.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__, markup=False, highlight=False)
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


@app.command("compile")
def compile_command(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT adapter directories or AIR files.")],
    base: Annotated[Path, typer.Option("--base", help="Base model directory (safetensors).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    target: Annotated[str, typer.Option("--target", help="Target; see `adaptrix targets`.")] = "merged",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Output dtype (default: the target's).")
    ] = None,
    unmerged: Annotated[
        bool, typer.Option("--unmerged", help="ONNX: LoRA and IA3 as swappable adapter files.")
    ] = False,
    quantize: Annotated[
        str | None, typer.Option("--quantize", help="ONNX: int8, int4 or int8-dynamic weights.")
    ] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="ONNX int8 / int4: block size (32).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="ONNX: where base exports are cached.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="ONNX int4 / int8: prompts file; blocks rounded by GPTQ on them."),
    ] = None,
    passes: Annotated[
        list[str] | None,
        typer.Option("--pass", help="Pass NAME[:key=value,...] to run before the target; repeat, in order."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Compile ADAPTERS for BASE into OUTPUT."""
    # Before torch loads: its OpenMP workers otherwise spin between parallel regions and take the
    # cores from the threads that read, hash and write (4 s of CPU in a 1.1B merge on 2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _run(lambda: _refuse_flag_values(adapters))
    _run(lambda: _hash_early(base))
    from adaptrix.toolchain.pipeline import compile_adapter

    options = {
        "unmerged": unmerged or None,
        "quantize": quantize,
        "block_size": block_size,
        "cache_dir": cache_dir,
        "calibration": calibration,
    }
    kwargs = {"dtype": dtype, "force": force, "options": options, "passes": passes or ()}
    with CompileProgress(err, enabled=not as_json) as bar:
        result = _run(lambda: compile_adapter(adapters, base, target, output, progress=bar.advance,
                                              phase=bar.phase, **kwargs), writing=output)  # fmt: skip
    if as_json:
        out.print_json(json.dumps({"output": str(result.out), "target": result.target,
                                   "dtype": result.dtype, "quantize": quantize, "files": result.files,
                                   "sites": result.sites}))  # fmt: skip
    else:
        numbers = result.dtype if quantize is None else _quantized(result.dtype, quantize)
        out.print(f"wrote {result.out} ({result.target}, {numbers}, {result.sites} sites)",
                  markup=False, highlight=False)  # fmt: skip


def _refuse_flag_values(adapters: list[Path]) -> None:
    """`--force true`: typer reads `true` as one more adapter; say that flags take no value."""
    for path in adapters:
        if str(path).lower() in ("true", "false", "yes", "no", "1", "0") and not path.exists():
            raise BadInputError(f"{str(path)!r} is not an adapter: --force, --unmerged and --json are flags "
                                "and take no value", fix=f"leave out {str(path)!r}")  # fmt: skip


def _hash_early(base: Path) -> None:
    """Start hashing the base's files (for the manifest) on the core torch's import leaves idle."""
    if base.is_dir():
        from adaptrix.toolchain.hashing import hash_early  # numpy: not at start-up of every command

        hash_early(sorted(p for p in base.iterdir() if p.is_file()))


def _quantized(dtype: str, scheme: str) -> str:
    """What a quantized artifact computes with: `float32 activations, int4 weights`."""
    weights = {"int8-dynamic": "int8 weights, dynamically quantized activations"}.get(scheme)
    return f"{dtype} activations, {weights or scheme + ' weights'}"


@app.command("convert")
def convert_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter directory or AIR file.")],
    to: Annotated[str, typer.Option("--to", help="air (one file) or peft (a directory).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (air) or directory (peft).")],
    base: Annotated[Path | None, typer.Option("--base", help="Base model: required for AIR to PEFT.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Re-export ADAPTER as an AIR file or a PEFT adapter directory."""
    from adaptrix.toolchain.convert import convert_adapter

    result = _run(lambda: convert_adapter(adapter, to, output, base=base, force=force), writing=output)
    if as_json:
        out.print_json(json.dumps({"output": str(result.out), "to": result.to, "files": result.files,
                                   "sites": result.sites,
                                   "base": None if result.base is None else str(result.base)}))  # fmt: skip
    else:
        out.print(f"wrote {result.out} ({result.to}, {result.sites} sites)", markup=False, highlight=False)


@app.command("inspect")
def inspect_command(
    adapter: Annotated[
        Path, typer.Argument(help="PEFT or AdapterHub adapter directory, AIR file, or a hooks bundle.")
    ],
    base: Annotated[Path | None, typer.Option("--base", help="Base model: show IR sites.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show an adapter's layers, roles, ranks, scales, parameters and bytes."""
    from adaptrix.toolchain.report import inspect_adapter

    summary = _run(lambda: inspect_adapter(adapter, base))
    if as_json:
        out.print_json(json.dumps(summary))
        return
    first = "role" if summary["rows"] and "role" in summary["rows"][0] else "module"
    table = Table(title=f"{adapter} ({summary['format']})")
    sized = ("size", "act", "shared") if any(row.get("size") for row in summary["rows"]) else ()
    typed = ("shape", "dtype") if any(row.get("shape") for row in summary["rows"]) else ("scale",)
    columns = ("layer", first, "op", "rank", *sized, *typed, "parameters", "bytes")
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("parameters", "bytes") else "left",
            overflow="fold",  # full module names, wrapped, never cut
        )
    for row in summary["rows"]:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    out.print(table)
    out.print(
        f"{len(summary['rows'])} entries over {len(summary['layers'])} layers; "
        f"{summary['parameters']:,} parameters, {summary['bytes']:,} bytes"
    )
    if summary.get("model_version") is not None:  # an .onnx_adapter: the base export it fits
        out.print(f"model version {summary['model_version']}", markup=False, highlight=False)


@app.command("archs")
def archs_command() -> None:
    """List the supported model architectures (model_type values)."""
    from adaptrix.toolchain.binders import BINDERS

    for model_type, binder in sorted(BINDERS.items()):
        out.print(f"{model_type:12} {binder.name} binder")


@app.command("targets")
def targets_command() -> None:
    """List the compile targets."""
    from adaptrix.targets import TARGETS

    for name, target in TARGETS.items():
        out.print(f"{name:12} {target.summary}")


@app.command("passes")
def passes_command() -> None:
    """List the passes `compile --pass` runs."""
    from adaptrix.passes import PASSES

    for name, spec in PASSES.items():
        out.print(f"{name:12} {spec.summary}", markup=False, highlight=False)


@app.command("version")
def version_command() -> None:
    """Print the version."""
    out.print(__version__)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):  # a shape
        return "x".join(map(str, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    """Console entry point."""
    app()


from adaptrix import cli_check, cli_run  # noqa: E402, F401  (register `run`, `parity`, `verify`)
