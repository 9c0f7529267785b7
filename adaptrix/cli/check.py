"""The CI commands: `adaptrix parity` (every backend against PEFT's forward) and `adaptrix verify`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adaptrix.cli.base import app, call, cell, out
from adaptrix.ir.errors import BadInputError

__all__ = ["parity_command", "verify_command"]


@app.command("parity")
def parity_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter directory or AIR file.")],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model: a directory or a cached hub id (default: the adapter's)."),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets",
            help="Comma-separated: merged, hooks, onnx-cpu, onnx-cuda "
            "(default: merged,hooks,onnx-cpu, or none when --artifact is given).",
        ),
    ] = None,
    artifacts: Annotated[
        list[str] | None,
        typer.Option("--artifact", help="TARGET=DIR: check an already compiled artifact; repeat."),
    ] = None,
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="JSON token ids (default: seeded random ids).")
    ] = None,
    tolerances: Annotated[
        list[str] | None,
        typer.Option("--tolerance", help="Max relative diff: VALUE for all, or TARGET=VALUE; repeat."),
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Where to compile (a temporary folder in it).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema 1).")] = False,
) -> None:
    """Check that every compiled backend of ADAPTER computes what PEFT computes; exit 1 if one does not."""
    from adaptrix.api.parity import parity

    chosen = call(lambda: _pairs(artifacts or [], "--artifact", Path))
    bounds = call(lambda: _pairs(tolerances or [], "--tolerance", float, default_key="*"))
    default = "" if chosen else "merged,hooks,onnx-cpu"
    names = [name.strip() for name in (default if targets is None else targets).split(",") if name.strip()]
    names = [name for name in names if name not in chosen]
    report = call(lambda: parity(adapter, base, names, inputs=inputs, tolerances=bounds,
                                 artifacts=chosen, work_dir=work_dir))  # fmt: skip
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:
        _print(report)
    if not report.ok:
        raise typer.Exit(1)


def _pairs(values: list[str], option: str, kind, default_key: str | None = None) -> dict:
    """`KEY=VALUE` options as a dict (a bare VALUE goes under default_key where one is allowed)."""
    parsed = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep:
            if default_key is None:
                raise BadInputError(f"{option} {text!r} is not TARGET=VALUE")
            key, value = default_key, text
        try:
            parsed[key.strip()] = kind(value.strip())
        except ValueError:
            raise BadInputError(f"{option} {text!r}: {value!r} is not a valid value") from None
    return parsed


def _print(report) -> None:
    owner = {"peft": "PEFT", "adapterhub": "AdapterHub"}[report.reference]
    table = Table(title=f"{report.output} against {owner}'s forward (inputs {report.inputs['shape']})")
    for column in ("target", "dtype", "max |diff|", "max rel", "top-1", "KL", "tolerance", "verdict"):
        table.add_column(column)
    for r in report.backends:
        table.add_row(r.target, r.dtype or "-", cell(r.max_abs), cell(r.max_rel), cell(r.top1_agreement),
                      cell(r.kl), cell(r.tolerance), _verdict(r))  # fmt: skip
    out.print(table)
    for r in report.backends:
        if r.note:
            out.print(f"{r.target}: {r.note}", markup=False, highlight=False)
    verdicts = [(r.target, _verdict(r)) for r in report.backends]
    unjudged = [target for target, verdict in verdicts if verdict == "not judged"]
    parts = [f"{kind} in {', '.join(t for t, v in verdicts if v == kind)}"
             for kind in ("FAILED", "MISMATCH") if any(v == kind for _, v in verdicts)]  # fmt: skip
    if not parts and len(unjudged) < len(verdicts):
        parts = [f"every {'judged ' if unjudged else ''}backend matches {owner}"]
    if unjudged:
        parts.append(f"not judged (no tolerance): {', '.join(unjudged)}")
    verdict = "; ".join(parts)
    out.print(f"parity: {verdict}")


def _verdict(result) -> str:
    """A row's verdict: ok, MISMATCH (outside its tolerance), FAILED (not compiled or run), not judged."""
    if result.ok is None:
        return "not judged"
    if result.ok:
        return "ok"
    return "FAILED" if result.max_rel is None and result.note.startswith("could not") else "MISMATCH"


@app.command("verify")
def verify_command(
    artifact: Annotated[Path, typer.Argument(help="A directory `adaptrix compile` wrote.")],
    skip_inputs: Annotated[
        bool, typer.Option("--skip-inputs", help="Do not re-hash the adapter and base it was built from.")
    ] = False,
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect", help="The sha256 manifest.json must have (as printed by an earlier verify)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema 1).")] = False,
) -> None:
    """Check ARTIFACT against its manifest (files, sizes, sha256, inputs, graph); exit 1 if one differs.

    This proves the files are the ones the manifest lists, not that the manifest is the one the
    compile wrote: pin that with --expect.
    """
    from adaptrix.api.verify import verify_artifact

    report = call(lambda: verify_artifact(artifact, inputs=not skip_inputs, expect=expect))
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:
        for line in report.problems:
            out.print(f"differs: {line}", markup=False, highlight=False, soft_wrap=True)
        for line in report.notes:
            out.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
        verdict = "intact" if report.ok else f"{len(report.problems)} difference(s)"
        summary = f"{report.checked_files} files, {report.checked_inputs} inputs checked: {verdict}"
        out.print(f"{artifact} ({report.target}): {summary}", markup=False, highlight=False, soft_wrap=True)
        pin = f"manifest.json sha256 {report.manifest_sha256} (pin it: adaptrix verify --expect SHA256)"
        out.print(pin, markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
