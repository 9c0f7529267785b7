"""Benchmark: the gguf target (q8_0) against the usual route, PEFT merge + llama.cpp's converter.

Run the whole benchmark under the shared heavy-job lock:
    flock /tmp/adaptrix-heavy.lock python benchmarks/gguf.py [--repeat N] [--rounds N] [--keep]
Reuses merge.py's cached fixture (1.1B bf16 Llama base + r=16 LoRA), with a synthetic Llama
tokenizer beside the base's weights (hard links; benchmarks/_gguf_fixture.py). In one run:

- each step in its own child (wall time, peak RSS with descendants; the base read into the page
  cache first), `repeat` rounds in rotating order: Adaptrix `compile --target gguf --quantize q8_0`
  (without adaptrix's hash cache: every input hashed, as on a first compile);
  the usual route, PEFT load + merge_and_unload + save_pretrained (with the tokenizer), then
  llama.cpp's convert_hf_to_gguf.py --outtype q8_0, run from the source package (sdist) of the
  installed llama-cpp-python with this Python (and the gguf-py of that llama.cpp, the converter's
  default: PyPI's gguf 0.19.0 lacks what this converter calls);
- decode speed of both q8_0 files in llama.cpp (llama-cpp-python, 2 threads): one decode step on a
  32-token KV cache, in interleaved rounds, ms/token; plus the two files' tensor types, tokenizer
  metadata and the agreement of their prefill logits (random weights: near-flat logits, reported, not judged).

Goals (ratios from this run only): Adaptrix >= 5x faster end to end than PEFT merge + save + convert,
peak RSS <= 1/4 of the usual route's, and the same decode speed (not more than 5% slower).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# This file is named gguf.py: keep its folder off the front of sys.path, so `import gguf` (here and
# inside llama.cpp's converter) finds the package, not this script.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
import _gguf_fixture as fx  # noqa: E402
import _measure as m  # noqa: E402
import merge  # noqa: E402  (puts HERE first again: moved back to the end below)

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

PROMPT = 32
THREADS = 2
QUANT = "q8_0"
TOK_FIXTURE = "llama-1.1b-bf16-tok-v1"
GOAL_SPEEDUP = 5.0  # the usual route's wall / Adaptrix's wall
GOAL_RSS_FRACTION = 0.25  # Adaptrix's peak RSS / the usual route's
DECODE_SLACK = 0.05  # "same decode speed": Adaptrix's file at most 5% slower per token
ADAPTRIX, PEFT, CONVERT = "adaptrix gguf q8_0", "peft merge + save", "convert_hf_to_gguf q8_0"
PEFT_SAVE_SCRIPT = (
    merge.PEFT_SCRIPT
    + "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(base).save_pretrained(out)\n"
)


def _onnx_bench():
    """benchmarks/onnx.py as a module (its name would shadow the onnx package): the interleave harness."""
    spec = importlib.util.spec_from_file_location("adaptrix_onnx_benchmark", HERE / "onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adaptrix_supports_gguf() -> str | None:
    """None when this adaptrix has the gguf target, else why not (one line)."""
    done = subprocess.run([sys.executable, "-m", "adaptrix", "targets"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`python -m adaptrix targets` failed: {done.stderr.strip()[-300:]}"
    if not any(line.split()[:1] == ["gguf"] for line in done.stdout.splitlines()):
        return "this adaptrix has no gguf target (`python -m adaptrix targets` does not list it)"
    return None


def adaptrix_argv(adapter: Path, base: Path, out: Path) -> list[str]:
    """The Adaptrix compile command line (python -m adaptrix: the adaptrix this Python imports)."""
    return [sys.executable, "-m", "adaptrix", "compile", str(adapter), "--base", str(base),
            "--target", "gguf", "-o", str(out), "--quantize", QUANT, "--force"]  # fmt: skip


def gguf_file(out: Path) -> Path | None:
    """The one .gguf file under an output directory, or None."""
    found = sorted(out.glob("*.gguf")) if out.is_dir() else []
    return found[0] if len(found) == 1 else None


class Run:
    """The measured children of one benchmark run: samples per step, the last outputs kept."""

    def __init__(self, root: Path, base: Path, adapter: Path, script: Path, convert_env: dict):
        self.root, self.base, self.adapter = root, base, adapter
        self.script, self.convert_env = script, convert_env
        self.results: dict[str, m.Summary] = {}

    def step(self, name: str, argv: list[str], out: Path, warm: Path, env: dict | None = None,
             folder: bool = False) -> bool:  # fmt: skip
        """Run one child into a fresh `out` (made first if `folder`), `warm` read into the page cache."""
        m.remove_and_sync(out)
        if folder:  # the converter writes a file: its folder must exist
            out.mkdir(parents=True)
        m.warm_page_cache(warm)
        log = self.root / f"{name.replace(' ', '_')}.log"
        s = m.run_measured(argv, log, env=env)
        print(
            f"  {name:<26} wall {s.wall_s:7.2f} s  peak RSS {s.peak_rss_mb:8.0f} MB  rc {s.returncode}",
            flush=True,
        )
        if s.returncode != 0:
            print(f"  {name} failed, log tail:\n{m.log_tail(log)}")
        self.results.setdefault(name, m.Summary(name)).samples.append(s)
        return s.returncode == 0

    def adaptrix(self) -> bool:
        """Adaptrix: adapter + base -> q8_0 GGUF in one command."""
        out = self.root / "adaptrix"
        # Every input hashed for the manifest, as on a first compile (no hash cache): the conservative figure.
        no_cache = {**os.environ, "ADAPTRIX_HASH_CACHE": "0"}
        return self.step(ADAPTRIX, adaptrix_argv(self.adapter, self.base, out), out, self.base, env=no_cache)

    def usual(self) -> bool:
        """PEFT merge + save_pretrained, then convert_hf_to_gguf.py --outtype q8_0 on the merged folder."""
        merged, out = self.root / "merged", self.root / "rival"
        peft = [sys.executable, "-c", PEFT_SAVE_SCRIPT, str(self.base), str(self.adapter), str(merged)]
        if not self.step(PEFT, peft, merged, self.base):
            return False
        convert = [sys.executable, str(self.script), str(merged), "--outtype", QUANT,
                   "--outfile", str(out / "model.gguf")]  # fmt: skip
        ok = self.step(CONVERT, convert, out, merged, env=self.convert_env, folder=True)
        m.remove_and_sync(merged)
        return ok

    def ok(self, name: str) -> bool:
        """Whether every run of a step succeeded."""
        r = self.results.get(name)
        return r is not None and all(s.returncode == 0 for s in r.samples)


def run_steps(run: Run, repeat: int, with_adaptrix: bool) -> None:
    """`repeat` rounds of both routes, the order rotating each round."""
    os.sync()
    routes = [run.adaptrix, run.usual] if with_adaptrix else [run.usual]
    for i in range(repeat):
        print(f"round {i + 1}/{repeat}", flush=True)
        for route in routes[i % len(routes) :] + routes[: i % len(routes)]:
            route()


def usual_samples(run: Run) -> list[tuple[float, float]]:
    """Per round of the usual route: (PEFT wall + convert wall, the larger peak RSS of the two)."""
    peft, conv = run.results[PEFT].samples, run.results[CONVERT].samples
    return [(p.wall_s + c.wall_s, max(p.peak_rss_mb, c.peak_rss_mb)) for p, c in zip(peft, conv, strict=True)]


def print_steps(run: Run, sizes: dict) -> None:
    """Table of the measured steps and the usual route's end-to-end total."""
    rows = [[r.name, len(r.samples), f"{r.median_wall_s:.2f}", f"{r.max_rss_mb:.0f}",
             f"{sizes.get(r.name, 0):.0f}", "ok" if run.ok(r.name) else "FAILED"]
            for r in run.results.values()]  # fmt: skip
    if run.ok(PEFT) and run.ok(CONVERT):
        usual = usual_samples(run)
        wall, rss = statistics.median(w for w, _ in usual), max(r for _, r in usual)
        rows.append(["usual route (peft + convert)", len(usual), f"{wall:.2f}", f"{rss:.0f}",
                     f"{sizes.get(CONVERT, 0):.0f}", "ok"])  # fmt: skip
    headers = ["step", "runs", "median wall s", "peak RSS MB", "out MB", "status"]
    print("\nsteps (children; page cache warm with each step's input)")
    print(m.format_table(headers, rows))


def compile_goals(run: Run) -> list[bool]:
    """PASS/FAIL lines for the end-to-end wall and peak RSS goals."""
    if not (run.ok(ADAPTRIX) and run.ok(PEFT) and run.ok(CONVERT)):
        print("FAIL: wall and RSS goals not measured (a step failed or did not run)")
        return [False, False]
    usual = usual_samples(run)
    usual_wall, usual_rss = statistics.median(w for w, _ in usual), max(r for _, r in usual)
    ours = run.results[ADAPTRIX]
    speedup, fraction = usual_wall / ours.median_wall_s, ours.max_rss_mb / usual_rss
    verdicts = [speedup >= GOAL_SPEEDUP, fraction <= GOAL_RSS_FRACTION]
    word = ["PASS" if v else "FAIL" for v in verdicts]
    print(f"{word[0]}: Adaptrix {ours.median_wall_s:.1f} s is {speedup:.2f}x faster end to end than PEFT "
          f"merge + save + convert_hf_to_gguf ({usual_wall:.1f} s); goal >= {GOAL_SPEEDUP:.0f}x")  # fmt: skip
    print(f"{word[1]}: Adaptrix peak RSS {ours.max_rss_mb:.0f} MB = {fraction:.3f} of the usual route's "
          f"({usual_rss:.0f} MB); goal <= {GOAL_RSS_FRACTION}")  # fmt: skip
    return verdicts


def read_gguf(path: Path) -> tuple[dict[str, str], dict]:
    """GGUF tensor name -> quantization type name; tokenizer.* metadata key -> value."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return types, {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def compare_files(files: dict[str, Path]) -> None:
    """Print whether the two files hold the same tensors and types (decode speed) and tokenizer metadata."""
    (a_name, (a, a_tok)), (b_name, (b, b_tok)) = ((n, read_gguf(p)) for n, p in files.items())
    counts = {n: len(t) for n, t in ((a_name, a), (b_name, b))}
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(f"tensors: {counts}; " + ("same names and types" if not differ else f"{len(differ)} differ, e.g. "
          + ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in differ[:4])))  # fmt: skip
    keys = sorted(k for k in a_tok.keys() | b_tok.keys() if a_tok.get(k) != b_tok.get(k))
    print(f"tokenizer metadata: {len(a_tok)} / {len(b_tok)} keys; " + (f"differ: {', '.join(keys)}" if keys
          else f"identical (tokenizer.ggml.model {a_tok.get('tokenizer.ggml.model')!r})"))  # fmt: skip


def load_llama(path: Path, threads: int):
    """A llama-cpp-python model on the CPU with `threads` threads, logits for every evaluated token.

    Loaded as Adaptrix's GGUF runtime loads it, without llama.cpp's extra CPU buffer types (no AMX /
    repacked weights): with them, this machine's source build of llama-cpp-python 0.3.36 segfaults
    in llama_decode on any q8_0 file, the converter's included.
    """
    from llama_cpp import Llama

    from adaptrix.runtimes.gguf import _plain_weights

    with _plain_weights():
        return Llama(model_path=str(path), n_ctx=2 * PROMPT, n_batch=PROMPT, n_threads=threads,
                     n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip


def bench_decode(files: dict[str, Path], rounds: int, steps: int, threads: int) -> tuple[dict, dict]:
    """Seconds of a decode step on a PROMPT-token KV cache per file (interleaved rounds); prefill logits."""
    import numpy as np

    prompt = np.random.default_rng(merge.SEED).integers(3, merge.BASE_CONFIG["vocab_size"], PROMPT).tolist()
    models = {name: load_llama(path, threads) for name, path in files.items()}
    logits = {}
    for name, llm in models.items():
        llm.eval(prompt)
        logits[name] = np.array(llm.scores[:PROMPT], dtype=np.float32)

    def step(llm) -> None:
        llm.n_tokens = PROMPT  # eval drops the cache past n_tokens: every step sees the same 32 tokens
        llm.eval(prompt[-1:])

    bench = _onnx_bench()
    calls = {name: bench.timed(lambda llm=llm: step(llm)) for name, llm in models.items()}
    return bench.interleave(calls, rounds, steps), logits


def decode_goal(times: dict, logits: dict, threads: int) -> bool:
    """Print the decode table, the logits comparison and the same-speed verdict."""
    (a_name, a), (b_name, b) = times.items()
    rows = [[n, f"{statistics.median(t) * 1e3:.2f}", f"{min(t) * 1e3:.2f}", f"{max(t) * 1e3:.2f}"]
            for n, t in times.items()]  # fmt: skip
    print(f"\ndecode step, {PROMPT}-token KV cache, llama.cpp {threads} threads: "
          f"medians over {len(a)} interleaved rounds")  # fmt: skip
    print(m.format_table(["file", "median ms/token", "min ms", "max ms"], rows))
    la, lb = logits.values()
    agree = float((la.argmax(-1) == lb.argmax(-1)).mean())
    print(f"check: prefill logits {a_name} vs {b_name}: max |diff| = {float(abs(la - lb).max()):.3e}, "
          f"top-1 agreement {agree:.1%} (random weights: near-flat logits; Adaptrix merges in fp32, "
          "PEFT in bf16)")  # fmt: skip
    ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
    ok = ratio <= 1 + DECODE_SLACK
    print(f"{'PASS' if ok else 'FAIL'}: decode {a_name} / {b_name} = {ratio:.3f} (median of paired rounds); "
          f"goal: the same speed, <= {1 + DECODE_SLACK:.2f}")  # fmt: skip
    return ok


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(
        description="Benchmark the gguf target against PEFT merge + convert_hf_to_gguf."
    )
    ap.add_argument("--repeat", type=int, default=2, help="rounds of both routes (default 2)")
    ap.add_argument("--rounds", type=int, default=15, help="decode rounds (default 15)")
    ap.add_argument("--steps", type=int, default=5, help="decode steps per file per round (default 5)")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[THREADS],
        help=f"llama.cpp thread counts: a decode table and verdict each (default {THREADS})",
    )
    ap.add_argument("--cache", type=Path, default=m.default_cache(), help="fixture cache dir")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (GGUF files, logs)")
    return ap.parse_args(argv)


def prepare(cache: Path) -> tuple[Path, Path, Path, dict]:
    """The fixture (base with tokenizer, adapter), the converter script and its environment."""
    fixture = merge.ensure_fixture(cache)
    base = fx.base_with_tokenizer(fixture / "base", cache / TOK_FIXTURE, merge.BASE_CONFIG["vocab_size"])
    script = fx.converter(cache)
    return base, fixture / "adapter", script, fx.converter_env(cache)


def main(argv=None) -> int:
    """Build or reuse the inputs, run both routes, time decoding, print tables and PASS/FAIL lines."""
    args = parse_args(argv)
    cache = args.cache.expanduser().resolve()
    base, adapter, script, env = prepare(cache)
    print(f"machine: {os.cpu_count()} cpus, python {platform.python_version()}, llama-cpp-python "
          f"{fx.llama_cpp_version()}, converter {script}")  # fmt: skip
    missing = adaptrix_supports_gguf()
    if missing:
        print(f"ERROR: Adaptrix side not measured: {missing}; the usual route runs alone")
    run = Run(Path(tempfile.mkdtemp(prefix="gguf-", dir=cache)), base, adapter, script, env)
    verdicts: list[bool] = []
    try:
        run_steps(run, max(1, args.repeat), with_adaptrix=missing is None)
        files = {name: gguf_file(run.root / d) for name, d in ((ADAPTRIX, "adaptrix"), (CONVERT, "rival"))}
        sizes = {name: f.stat().st_size / 2**20 for name, f in files.items() if f is not None}
        print_steps(run, sizes)
        print()
        verdicts += compile_goals(run)
        if all(files.values()):
            compare_files(files)
            for threads in args.threads:
                times, logits = bench_decode(files, max(1, args.rounds), max(1, args.steps), threads)
                verdicts.append(decode_goal(times, logits, threads))
        else:
            print("FAIL: decode speed not measured (a GGUF file is missing)")
            verdicts.append(False)
    finally:
        if args.keep:
            print(f"kept {run.root}")
        else:
            shutil.rmtree(run.root, ignore_errors=True)
    print(f"\nsummary: {sum(verdicts)}/{len(verdicts)} goals passed")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
