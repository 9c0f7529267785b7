"""The `adaptrix` command: parses options, calls the API, prints. The work lives in the API."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from adaptrix import __version__
from adaptrix.toolchain.errors import AdaptrixError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Adaptrix: compile model adapters into merged models, hook bundles and ONNX.",
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}
T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run an API call; an AdaptrixError becomes one line on stderr and its exit code."""
    try:
        return action()
    except AdaptrixError as exc:
        if _state["debug"]:
            traceback.print_exc()
        err.print(f"error: {exc.line()}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")] = False,
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
    if base.is_dir():  # the manifest hashes the base: start now, on the core the import leaves idle
        from adaptrix.toolchain.hashing import hash_early  # numpy: not at start-up of every command

        hash_early(sorted(p for p in base.iterdir() if p.is_file()))
    from adaptrix.toolchain.pipeline import compile_adapter

    options = {
        "unmerged": unmerged or None,
        "quantize": quantize,
        "block_size": block_size,
        "cache_dir": cache_dir,
        "calibration": calibration,
    }
    kwargs = {"dtype": dtype, "force": force, "options": options, "passes": passes or ()}
    with _progress(enabled=not as_json) as progress:
        result = _run(lambda: compile_adapter(adapters, base, target, output, progress=progress, **kwargs))
    if as_json:
        out.print_json(json.dumps({"output": str(result.out), "target": result.target,
                                   "dtype": result.dtype, "files": result.files,
                                   "sites": result.sites}))  # fmt: skip
    else:
        out.print(f"wrote {result.out} ({result.target}, {result.dtype}, {result.sites} sites)")


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

    result = _run(lambda: convert_adapter(adapter, to, output, base=base, force=force))
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
    columns = ("layer", first, "op", "rank", *sized, "scale", "parameters", "bytes")
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
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _progress:  # noqa: N801 - a context manager used like a function
    """A progress bar over bytes on stderr, shown only on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and err.is_terminal
        self._bar = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self._bar = Progress("{task.description}", BarColumn(), DownloadColumn(),
                             TimeRemainingColumn(), console=err, transient=True)  # fmt: skip
        self._bar.start()
        task = self._bar.add_task("compiling", total=None)
        done = [0]

        def advance(step: int, total: int) -> None:
            done[0] += step
            self._bar.update(task, completed=done[0], total=total)

        return advance

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def main() -> None:
    """Console entry point."""
    app()


from adaptrix import cli_check, cli_run  # noqa: E402, F401  (register `run`, `parity`, `verify`)
