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
        Path,
        typer.Argument(help="PEFT or AdapterHub adapter, AIR file, hooks bundle or compiled artifact."),
    ],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (a directory or a cached hub id): show IR sites.")
    ] = None,
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
    if summary.get("target") is not None:  # a compiled artifact: what its manifest says
        passes = ", ".join(summary["passes"]) or "none"
        out.print(f"{summary['target']} for a {summary['arch']} base, {summary['dtype']}, {summary['sites']} "
                  f"sites; passes: {passes}", markup=False, highlight=False)  # fmt: skip
    if summary.get("route"):  # several adapters: how separable their prototypes are
        routing = summary["route"]
        pairs = ", ".join(f"{pair} {value:.3f}" for pair, value in routing["overlap"].items())
        out.print(f"routes {len(routing['adapters'])} adapters (top_k {routing['top_k']}, temperature "
                  f"{routing['temperature']}) over {routing['modules']} modules; mean |cos| of their "
                  f"prototypes: {pairs}", markup=False, highlight=False)  # fmt: skip
    if summary.get("model_version") is not None:  # an .onnx_adapter: the base export it fits
        out.print(f"model version {summary['model_version']}", markup=False, highlight=False)


@app.command("archs")
def archs_command(
    everything: Annotated[
        bool, typer.Option("--all", help="also every text family transformers has (module tree)")
    ] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print a markdown table")] = False,
) -> None:
    """List the model families and what each compiles to (merged, hooks, onnx, roles for passes / AIR)."""
    from adaptrix.api.archs import FAMILY_COLUMNS, families, families_markdown

    if markdown:
        out.print(families_markdown(everything), end="", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(*FAMILY_COLUMNS)
    for row in families(everything):
        table.add_row(*(cell(row[column]) for column in FAMILY_COLUMNS))
    out.print(table)
    if not everything:
        note = ("any other family transformers can build: merged, hooks and --to peft through its "
                "module tree, onnx where optimum exports it; see --all")  # fmt: skip
        out.print(note, markup=False, highlight=False)


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
