"""This checkout's merge against another revision's, on benchmarks/merge.py's 1.1B base, in one run.

A change to the binders or the checkpoint reader must not slow the merge of the families it
measured before (issue 25: the generic binder never builds a module tree for a base its table
places whole). The other revision is checked out into a temporary git worktree; both compile the
same adapter with `--target merged`, interleaved, page cache warm; the ratio of medians is printed.

    python benchmarks/merge_revisions.py [--against e230e10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import default_cache
from merge import ensure_fixture  # the cached 1.1B bf16 Llama and its r16 adapter

ROOT = Path(__file__).resolve().parents[1]


def _compile(checkout: Path, adapter: Path, base: Path, out: Path) -> float:
    """Seconds one `adaptrix compile --target merged` of `checkout`'s code takes (a fresh process)."""
    shutil.rmtree(out, ignore_errors=True)
    code = ("import sys; from adaptrix.cli import main; sys.argv = ['adaptrix', 'compile', sys.argv[1], "
            "'--base', sys.argv[2], '--target', 'merged', '-o', sys.argv[3]]; main()")  # fmt: skip
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(adapter), str(base), str(out)], check=True,
                   env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    """Time both revisions, interleaved, and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="e230e10", help="the other revision (default: before issue 25)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    found = ensure_fixture(default_cache())
    adapter, base = found / "adapter", found / "base"
    for file in sorted(base.glob("*.safetensors")):  # warm: both read the base from the page cache
        file.read_bytes()
    with tempfile.TemporaryDirectory(prefix="adaptrix-rev-") as scratch:
        other = Path(scratch) / "checkout"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.against],
                       check=True, capture_output=True)  # fmt: skip
        try:
            times: dict[str, list[float]] = {"this checkout": [], args.against: []}
            for _ in range(args.repeat):
                times["this checkout"].append(_compile(ROOT, adapter, base, Path(scratch) / "a"))
                times[args.against].append(_compile(other, adapter, base, Path(scratch) / "b"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>14}: median {value:.2f} s of {', '.join(f'{v:.2f}' for v in times[name])}")
    print(
        f"ratio this / {args.against}: {medians['this checkout'] / medians[args.against]:.3f} (goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
