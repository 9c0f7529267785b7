"""Coverage sweep: every text family of transformers' LM auto mappings, PEFT's all-linear LoRA, each target.

    python benchmarks/coverage.py [--targets merged,hooks,onnx-cpu] [--only llama,t5] [--jobs N]
                                  [--timeout 120] [--markdown FILE] [--json FILE]

Each (family, mapping) runs in its own forked process (the parent imports torch, transformers and
PEFT once) with a timeout: a tiny seeded base from the family's config (tests/families.py), a LoRA
on `target_modules="all-linear"` and PEFT's fp32 forward as the reference, then each target
compiled by Adaptrix and compared (max |diff| <= 1e-4; onnx-cpu 5e-4). Prints a markdown table and
the totals, with the failures grouped by message.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# benchmarks/onnx.py would shadow the onnx package that the onnx-cpu target imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from coverage_sweep import TARGETS, quiet, sweep_family  # noqa: E402
from families import MAPPINGS, all_cases  # noqa: E402


def _child(case: tuple[str, str], root: Path, targets: tuple[str, ...], conn) -> None:
    """Run one family, sending the row after each step; its own output goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import torch

    torch.set_num_threads(1)
    quiet()
    conn.send(sweep_family(*case, root, targets, report=conn.send))
    conn.close()


def _unfinished(row: dict, targets: tuple[str, ...], why: str) -> dict:
    """The row of a family whose process hung or died: `why` on the step it was in."""
    if "peft" not in row:
        return {**row, "build": why, "peft": "-"}
    step = next((t for t in targets if t not in row), None)
    return {**row, step: why} if step else row


def run_all(cases, targets, jobs: int, timeout: float, workdir: Path, progress=None) -> list[dict]:
    """Sweep `cases` with at most `jobs` processes at once; rows in the order of `cases`."""
    context = multiprocessing.get_context("fork")
    pending, running, rows = list(enumerate(cases)), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            index, case = pending.pop(0)
            running[index] = _Running(context, case, workdir / f"{index:03d}-{case[0]}-{case[1]}", targets)
        for index, job in list(running.items()):
            if job.finished(timeout):
                rows[index] = job.row
                del running[index]
                if progress:
                    progress(len(rows), len(cases), job.row)
        time.sleep(0.02)
    return [rows[i] for i in range(len(cases))]


class _Running:
    """One family's process: the last row it sent, killed past the timeout."""

    def __init__(self, context, case: tuple[str, str], root: Path, targets: tuple[str, ...]) -> None:
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_child, args=(case, root, targets, send), daemon=True)
        self.process.start()
        send.close()
        self.root, self.targets, self.start = root, targets, time.monotonic()
        self.row: dict = {"family": case[0], "mapping": case[1]}
        self.closed = False

    def finished(self, timeout: float) -> bool:
        """Read what the process sent; True (and the row complete) once it ended or was killed."""
        while not self.closed and self.receive.poll():
            try:
                self.row = self.receive.recv()
            except EOFError:
                self.closed = True
        elapsed = time.monotonic() - self.start
        if not self.closed and elapsed <= timeout:
            return False
        if not self.closed:
            self.process.kill()
            self.row = _unfinished(self.row, self.targets, f"timeout after {timeout:.0f} s")
        self.process.join()
        if self.process.exitcode not in (0, -9):
            self.row = _unfinished(
                self.row, self.targets, f"process died (exit code {self.process.exitcode})"
            )
        self.row = {**self.row, "seconds": round(elapsed, 1)}
        shutil.rmtree(self.root, ignore_errors=True)
        return True


def _cell(row: dict, key: str) -> str:
    """A table cell: ok / mismatch with the diff / the outcome text, pipes escaped."""
    value = row.get(key, "-")
    diff = row.get(f"{key}_diff")
    if value == "mismatch":
        value = f"mismatch {diff:.1e}"
    text = str(value)
    return (text if len(text) <= 100 else text[:99] + "…").replace("|", "\\|")


def markdown(rows: list[dict], targets: tuple[str, ...]) -> str:
    """The rows as a markdown table: family, mapping, PEFT, one column per target, note."""
    head = ["family", "mapping", "PEFT", *targets, "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        built = row.get("build") == "ok"
        note = "" if built else _cell(row, "build")
        peft = _cell(row, "peft") if built else "-"
        cells = [_cell(row, t) if row.get("peft") == "ok" else "-" for t in targets]
        lines.append("| " + " | ".join([row["family"], row["mapping"], peft, *cells, note]) + " |")
    return "\n".join(lines)


def _group(text: str) -> str:
    """A message with its particulars (paths, quoted names, numbers) blanked, to group alike ones."""
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", text)[:120]


def totals(rows: list[dict], targets: tuple[str, ...], top: int = 8) -> str:
    """The totals: families built, PEFT ok / failing, each target ok of PEFT's, failures grouped."""
    built = [r for r in rows if r.get("build") == "ok"]
    adapted = [r for r in built if r.get("peft") == "ok"]
    skipped = [r for r in rows if str(r.get("build")).startswith("skip")]
    lines = [
        f"- {len(rows)} (family, mapping) cases; {len(skipped)} skipped (not text, external package); "
        f"{len(rows) - len(skipped) - len(built)} failed to build a tiny model; {len(built)} built",
        f"- PEFT adapts {len(adapted)} of {len(built)}; fails on {len(built) - len(adapted)}",
    ]
    for target in targets:
        good = sum(r.get(target) == "ok" for r in adapted)
        lines.append(f"- {target} on {good} of {len(adapted)} families PEFT can adapt")
    lines += _groups("PEFT failures", [r for r in built if r.get("peft") != "ok"], "peft", top)
    unbuilt = [r for r in rows if r.get("build") != "ok" and not str(r.get("build")).startswith("skip")]
    lines += _groups("build failures", unbuilt, "build", top)
    for target in targets:
        failed = [r for r in adapted if r.get(target) != "ok"]
        lines += _groups(f"{target} failures", failed, target, top)
    return "\n".join(lines)


def _groups(title: str, rows: list[dict], key: str, top: int) -> list[str]:
    """Up to `top` groups of alike messages, most common first, with a few of their families."""
    if not rows:
        return []
    by_message: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        text = "mismatch" if row.get(key) == "mismatch" else str(row.get(key))
        by_message[_group(text)].append(f"{row['family']}:{row['mapping']}")
    counts = Counter({message: len(names) for message, names in by_message.items()})
    lines = [f"\n{title} ({len(rows)}), grouped:"]
    for message, count in counts.most_common(top):
        names = by_message[message]
        more = f", +{len(names) - 6}" if len(names) > 6 else ""
        lines.append(f"  {count:3d}  {message[:160]}  [{', '.join(names[:6])}{more}]")
    return lines


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="merged,hooks", help="comma list of: " + ",".join(TARGETS))
    parser.add_argument("--only", default="", help="comma list of model types (default: every family)")
    parser.add_argument("--mappings", default=",".join(MAPPINGS), help="comma list of: " + ",".join(MAPPINGS))
    parser.add_argument("--jobs", type=int, default=1, help="families run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per family (default 120)")
    parser.add_argument("--markdown", type=Path, help="also write the table and totals into this file")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON into this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    if unknown := set(targets) - set(TARGETS):
        sys.exit(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    only, mappings = set(filter(None, args.only.split(","))), set(args.mappings.split(","))
    cases = [(f, m) for f, m in all_cases() if (not only or f in only) and m in mappings]
    quiet()
    workdir = Path(tempfile.mkdtemp(prefix="adaptrix-coverage-"))
    os.environ.setdefault("ADAPTRIX_CACHE_DIR", str(workdir / "onnx-cache"))
    os.environ.setdefault("XDG_CACHE_HOME", str(workdir / "cache"))  # Adaptrix's hash cache, thrown away
    start = time.monotonic()

    def progress(done, total, row):
        outcome = ", ".join(f"{k} {_cell(row, k)}" for k in ("build", "peft", *targets) if k in row)
        print(f"[{done}/{total}] {row['family']} ({row['mapping']}): {outcome[:150]}", file=sys.stderr)

    try:
        rows = run_all(cases, targets, args.jobs, args.timeout, workdir, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = f"{markdown(rows, targets)}\n\n{totals(rows, targets)}\n"
    print(report)
    print(f"({time.monotonic() - start:.0f} s, {args.jobs} job(s))")
    if args.markdown:
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
