"""`adaptrix inspect` and the listings: `archs`, `targets`, `passes`, `version`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adaptrix.artifacts import ADAPTRIX_VERSION
from adaptrix.cli.base import app, call, cell, out

__all__ = ["archs_command", "inspect_command", "passes_command", "targets_command", "version_command"]


@app.command("inspect")
def inspect_command(
    adapter: Annotated[
        Path, typer.Argument(help="PEFT or AdapterHub adapter directory, AIR file, or a hooks bundle.")
    ],
    base: Annotated[Path | None, typer.Option("--base", help="Base model: show IR sites.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show an adapter's layers, roles, ranks, scales, parameters and bytes."""
    from adaptrix.api.inspect import inspect_adapter

    summary = call(lambda: inspect_adapter(adapter, base))
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
        table.add_row(*(cell(row.get(c)) for c in columns))
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
    from adaptrix.binders import BINDERS

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
    out.print(ADAPTRIX_VERSION)
