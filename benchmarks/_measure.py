"""Shared helpers for adaptrix benchmarks: child-process timing, peak RSS, cache paths."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

CACHE_ENV = "ADAPTRIX_BENCH_CACHE"
READ_CHUNK = 1024 * 1024


@dataclass
class Sample:
    """One measured child run."""

    wall_s: float
    peak_rss_mb: float
    returncode: int


@dataclass
class Summary:
    """Repeated runs of one named command."""

    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median_wall_s(self) -> float:
        """Median wall-clock seconds over the samples."""
        return statistics.median(s.wall_s for s in self.samples)

    @property
    def max_rss_mb(self) -> float:
        """Largest peak RSS (MB) over the samples."""
        return max(s.peak_rss_mb for s in self.samples)


def default_cache() -> Path:
    """Return the benchmark cache dir (env ADAPTRIX_BENCH_CACHE or ~/.cache/adaptrix-bench)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaptrix-bench"


# A tiny launcher (python -I -S) runs the command and reports the command's own wall time and
# ru_maxrss. Launching straight from this process would not do: exec records the pre-exec
# (forked) memory high-water mark, so every child's ru_maxrss would be floored at our RSS.
LAUNCHER = """
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(report, "w") as f:
    f.write("%r %d" % (wall, ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def descendants_rss_bytes(proc: psutil.Process) -> int:
    """Return the summed RSS of all live descendants of proc (not proc itself)."""
    total = 0
    try:
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0
    for k in kids:
        with contextlib.suppress(psutil.Error):
            total += k.memory_info().rss
    return total


def _poll_tree(pid: int, stop: threading.Event, peak: list[int], interval: float) -> None:
    """Poll the summed RSS of pid's descendants until stop is set, keeping the max in peak[0]."""
    try:
        launcher = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        peak[0] = max(peak[0], descendants_rss_bytes(launcher))
        stop.wait(interval)


def run_measured(
    cmd: list[str], log_path: Path | None = None, env: dict | None = None, poll_s: float = 0.02
) -> Sample:
    """Run cmd via the launcher; return its wall time and peak RSS including descendants."""
    fd, report = tempfile.mkstemp(prefix="adaptrix-bench-", suffix=".rusage")
    os.close(fd)
    try:
        with open(log_path or os.devnull, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, report, *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
            stop, peak = threading.Event(), [0]
            poller = threading.Thread(target=_poll_tree, args=(proc.pid, stop, peak, poll_s), daemon=True)
            poller.start()
            rc = proc.wait()
            stop.set()
            poller.join()
        text = Path(report).read_text().split()
    finally:
        os.unlink(report)
    wall, maxrss_kib = (float(text[0]), int(text[1])) if len(text) == 2 else (float("nan"), 0)
    # ru_maxrss covers the command plus its reaped descendants (a max, not a sum);
    # polling sums concurrent descendants, so report whichever is larger.
    return Sample(wall, max(maxrss_kib * 1024, peak[0]) / 2**20, rc)


def warm_page_cache(path: Path) -> int:
    """Read every file under path once so it sits in the page cache; return bytes read."""
    total, buf = 0, bytearray(READ_CHUNK)
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def dir_size_mb(path: Path) -> float:
    """Return the total size of files under path in MB."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def remove_and_sync(path: Path) -> None:
    """Delete path if present and flush dirty pages so the next run starts clean."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def log_tail(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log file, or an empty string."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Format rows as a plain left-aligned text table."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def load_tensor(folder: Path, name: str):
    """Load one tensor from a (possibly sharded) safetensors folder, or None if absent."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text())["weight_map"].get(name)
        path = folder / shard if shard else None
    else:
        path = folder / "model.safetensors"
    if path is None or not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name) if name in f.keys() else None  # noqa: SIM118


def max_bf16_ulps(a, b) -> int:
    """Return the largest distance in bf16 ulps between two bf16 tensors."""
    import torch

    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((ordered(a) - ordered(b)).abs().max())


class OrtDecoder:
    """A decoder graph in onnxruntime on the CPU provider, fed by name."""

    def __init__(self, path: Path, threads: int = 2, options=None):
        import onnxruntime as ort

        options = options or ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        _, self.kv_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        if not isinstance(self.kv_heads, int) or not isinstance(self.head_dim, int):  # the builder's graph
            decoder = json.loads((Path(path).parent / "genai_config.json").read_text())["model"]["decoder"]
            self.kv_heads, self.head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = set(inputs)

    def empty_past(self) -> dict:
        """Past key/values of length 0."""
        import numpy as np

        zero = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {f"past_key_values.{i}.{kv}": zero for i in range(self.layers) for kv in ("key", "value")}

    def forward(self, ids, past: dict | None = None):
        """(logits, the next call's past) for input_ids `ids` [1, n] after `past`."""
        import numpy as np

        past = past if past is not None else self.empty_past()
        done = past["past_key_values.0.key"].shape[2]
        n = ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, done + n), dtype=np.int64),
                 "position_ids": np.arange(done, done + n, dtype=np.int64)[None], **past}  # fmt: skip
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}  # the builder's graph: no positions
        values = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
        present = {k.replace("present.", "past_key_values."): v for k, v in values.items() if k != "logits"}
        return values["logits"], present
