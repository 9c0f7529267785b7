"""Benchmark: the onnx-cpu target on a 1.1B Llama (compile cost, CPU latency) and quantization quality.

Run: python benchmarks/onnx.py [--repeat N] [--rounds N] [--skip-peft] [--builder-python PY]
                              [--quality-only | --latency-only | --compile-only | --versus-builder]
Reuses merge.py's cached fixture (1.1B bf16 Llama base + r=16 LoRA). In one run:

- compiles, each in its own child (wall time, peak RSS with descendants): the first compile of the
  fixture adapter into a fresh export cache (optimum export + patch), a second adapter's compile on
  the cached export, a plain `cp` of the cached model.onnx + model.onnx_data, PEFT merge_and_unload
  then optimum's main_export (the usual route), and int8 / int4 / int4-sym / int8-dynamic
  compiles on the cached export;
- latency with 2 intra-op threads: one decode step on a 32-token KV cache and a 32-token prefill,
  PyTorch eager float32 (the PEFT-merged model) against onnxruntime's CPU provider on the fp32,
  int8, int4, int4-sym and int8-dynamic artifacts, in interleaved rounds (medians and ratios from this run);
- against onnxruntime-genai's model builder (_onnx_builder.py): its int4 and int8 graphs of the same
  base built in this run, and Adaptrix's int4-sym / int4 / int8 graphs beside them, all run by
  onnxruntime-genai with one harness (32-token prompt, greedy, 2 threads, interleaved rounds of 16
  tokens): decode ms/token, prefill ms, nodes, ratio Adaptrix / builder. The builder's int4 is
  symmetric blocks without zero points, so int4-sym (the same kernel) carries the int4 goal;
  Adaptrix's int4, with zero points, is reported beside it;
- quality: greedy top-1 agreement of each quantized scheme with fp32 on a small decoder trained on a
  synthetic corpus (benchmarks/_onnx_quality.py; trained once, cached), the builder's graphs of the
  PEFT-merged decoder beside Adaptrix's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named onnx.py: keep its folder off the front of sys.path, so `import onnx` (here
# and inside onnxruntime, optimum, adaptrix) finds the package, not this script.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
import onnx  # noqa: E402, F401  the package, imported before merge.py puts this folder first

# isort: split
import _measure as m  # noqa: E402
import _onnx_builder as builder  # noqa: E402
import _onnx_quality as quality  # noqa: E402
import merge  # noqa: E402

PROMPT = 32
THREADS = 2
GOAL_SECOND_VS_CP = 2.0  # second compile wall <= 2x copying the ONNX weights
GOAL_REEXPORT_SPEEDUP = 5.0  # second compile >= 5x faster than PEFT merge + optimum export
GOAL_DECODE_SPEEDUP = 4.0  # fastest quantized decode >= 4x faster than PyTorch eager fp32
NEW_TOKENS, GENAI_ROUNDS = 16, 5  # the builder comparison: tokens per round, interleaved rounds
SCHEMES = ("int8", "int4", "int4-sym", "int8-dynamic")  # adaptrix --quantize

PEFT_OPTIMUM_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from optimum.exporters.onnx import main_export
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out + "/merged")
del model
main_export(out + "/merged", out + "/onnx", task="text-generation-with-past", device="cpu", dtype="fp32",
            local_files_only=True, do_validation=False)
"""


def compile_argv(exe: str, adapter: Path, base: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """Return the adaptrix onnx-cpu compile command line."""
    return [exe, "compile", str(adapter), "--base", str(base), "--target", "onnx-cpu", "-o", str(out),
            "--cache-dir", str(cache), "--force", *extra]  # fmt: skip


def export_entry(cache: Path) -> Path:
    """The one cached export under an adaptrix ONNX cache dir."""
    entries = [p for p in cache.iterdir() if (p / "export.json").is_file()]
    if len(entries) != 1:
        sys.exit(f"expected one cached export under {cache}, found {len(entries)}")
    return entries[0]


class Steps:
    """Runs the measured children of one benchmark run and keeps their samples and output sizes."""

    def __init__(self, run_root: Path, env: dict):
        self.root, self.env = run_root, env
        self.results: dict[str, m.Summary] = {}
        self.sizes: dict[str, float] = {}

    def run(self, name: str, argv: list[str], out: Path, warm: Path | None = None, keep: bool = True) -> bool:
        """Run one child (reading `warm` into the page cache first); return whether it succeeded."""
        if warm is not None:
            m.warm_page_cache(warm)
        log = self.root / f"{name.replace(' ', '_')}.log"
        s = m.run_measured(argv, log, env=self.env)
        print(f"  {name:<24} wall {s.wall_s:7.2f} s  peak RSS {s.peak_rss_mb:8.0f} MB  rc {s.returncode}",
              flush=True)  # fmt: skip
        if s.returncode != 0:
            print(f"  {name} failed, log tail:\n{m.log_tail(log)}")
        self.results.setdefault(name, m.Summary(name)).samples.append(s)
        self.sizes[name] = m.dir_size_mb(out) if out.exists() else 0.0
        if not keep or s.returncode != 0:
            m.remove_and_sync(out)
        return s.returncode == 0

    def ok(self, name: str) -> bool:
        """Whether every run of a step succeeded."""
        r = self.results.get(name)
        return r is not None and all(s.returncode == 0 for s in r.samples)


def run_compiles(
    exe: str,
    base: Path,
    adapter: Path,
    root: Path,
    repeat: int,
    skip_peft: bool,
    block_size: int | None,
    schemes: tuple[str, ...] = SCHEMES,
) -> Steps:
    """First compile; cp / second compile interleaved `repeat` times (0: none); PEFT + optimum; SCHEMES."""
    cache = root / "onnx-cache"
    # A fresh hash cache too (adaptrix keeps it under XDG_CACHE_HOME): the first compile hashes the
    # base and fills it, as a user's first compile would; later compiles read the base's digests from it.
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    steps = Steps(root, {**os.environ, "XDG_CACHE_HOME": str(root / "xdg"), "HF_HOME": hf_home})
    os.sync()
    first = compile_argv(exe, adapter, base, root / "fp32", cache)
    if not steps.run("first compile fp32", first, root / "fp32"):
        sys.exit("the first compile failed; nothing else can run")
    entry = export_entry(cache)
    adapter2 = make_second_adapter(adapter, root / "adapter2")
    files = [str(entry / name) for name in ("model.onnx", "model.onnx_data")]
    copy = ["sh", "-c", f'mkdir -p "{root / "cp"}" && cp "$@" "{root / "cp"}/"', "cp", *files]
    second = compile_argv(exe, adapter2, base, root / "second", cache)
    for _ in range(repeat):
        steps.run("cp ONNX weights", copy, root / "cp", warm=entry, keep=False)
        steps.run("second compile fp32", second, root / "second", warm=entry, keep=False)
    if skip_peft:
        print("  peft merge + optimum export: skipped")
    else:
        (root / "peft").mkdir()
        argv = [sys.executable, "-c", PEFT_OPTIMUM_SCRIPT, str(base), str(adapter), str(root / "peft")]
        steps.run("peft merge + optimum", argv, root / "peft", keep=False)
    for scheme in schemes:
        extra = ["--block-size", str(block_size)] if scheme != "int8-dynamic" and block_size else []
        argv = compile_argv(exe, adapter, base, root / scheme, cache, "--quantize", scheme, *extra)
        steps.run(f"compile {scheme}", argv, root / scheme, warm=entry)
    return steps


def make_second_adapter(adapter: Path, dest: Path) -> Path:
    """Copy the adapter with every lora_B scaled by -0.5 (as benchmarks/hooks.py does)."""
    import hooks

    return hooks.make_second_adapter(adapter, dest)


def print_compile_table(steps: Steps) -> None:
    """Print the compile steps with ratios against the plain copy of the ONNX weights."""
    copy = steps.results.get("cp ONNX weights")
    cp = copy.median_wall_s if copy is not None else float("nan")
    rows = [[r.name, len(r.samples), f"{r.median_wall_s:.2f}", f"{r.max_rss_mb:.0f}",
             f"{r.median_wall_s / cp:.2f}", f"{steps.sizes.get(r.name, 0):.0f}",
             "ok" if steps.ok(r.name) else "FAILED"]
            for r in steps.results.values()]  # fmt: skip
    headers = ["step", "runs", "median wall s", "peak RSS MB", "wall x cp", "out MB", "status"]
    print("\ncompile steps (children; page cache warm with the cached export)")
    print(m.format_table(headers, rows))


def print_compile_goals(steps: Steps) -> list[bool]:
    """Print PASS/FAIL lines for the second compile's goals; return the verdicts."""
    if "second compile fp32" not in steps.results:
        print("SKIP: second compile goals (--latency-only)")
        return []
    second = steps.results["second compile fp32"].median_wall_s
    cp = steps.results["cp ONNX weights"].median_wall_s
    verdicts = [second <= GOAL_SECOND_VS_CP * cp]
    print(f"{'PASS' if verdicts[0] else 'FAIL'}: second compile {second:.2f} s = {second / cp:.2f}x the copy "
          f"of the ONNX weights ({cp:.2f} s); goal <= {GOAL_SECOND_VS_CP:.1f}x")  # fmt: skip
    peft = steps.results.get("peft merge + optimum")
    if peft is None or not steps.ok(peft.name):
        print("SKIP: second compile vs PEFT merge + optimum export (not measured)")
        return verdicts
    speedup = peft.median_wall_s / second
    verdicts.append(speedup >= GOAL_REEXPORT_SPEEDUP)
    print(f"{'PASS' if verdicts[-1] else 'FAIL'}: second compile is {speedup:.1f}x faster than PEFT merge + "
          f"optimum export ({peft.median_wall_s:.1f} s); goal >= {GOAL_REEXPORT_SPEEDUP:.0f}x")  # fmt: skip
    return verdicts


def load_eager(base: Path, adapter: Path):
    """The fixture base in float32 with the adapter merged by PEFT, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def interleave(calls: dict, rounds: int, steps: int) -> dict:
    """Rounds over the variants (order rotating); per variant one untimed call, then the median of `steps`.

    Each call returns its own seconds. Round 0 warms up and is not kept.
    """
    names, times = list(calls), {name: [] for name in calls}
    for r in range(rounds + 1):  # round 0 warms up, untimed
        for name in names[r % len(names) :] + names[: r % len(names)]:
            calls[name]()
            per = [calls[name]() for _ in range(steps)]
            if r:
                times[name].append(statistics.median(per))
    return times


def timed(fn):
    """fn wrapped to return its own seconds."""

    def call() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return call


def bench_latency(model, decoders: dict, ids, rounds: int, steps: int) -> tuple[dict, dict, dict]:
    """Decode-step and prefill seconds per variant, and the fp32 graphs' agreement with eager."""
    import torch

    np_ids = ids.numpy()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache, eager_logits = out.past_key_values, out.logits.float().numpy()
    pasts = {name: d.forward(np_ids)[1] for name, d in decoders.items()}
    token = ids[:, -1:]

    def eager_step() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True)
            elapsed = time.perf_counter() - t0
        cache.crop(PROMPT)  # every step sees exactly the 32-token cache
        return elapsed

    def eager_prefill():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    decode = {"eager": eager_step}
    prefill = {"eager": timed(eager_prefill)}
    for name, d in decoders.items():  # the ONNX graphs return new present tensors: the past stays 32 long
        decode[name] = timed(lambda d=d, past=pasts[name]: d.forward(token.numpy(), past))
        prefill[name] = timed(lambda d=d: d.forward(np_ids))
    check = logits_check(eager_logits, {name: d.forward(np_ids)[0] for name, d in decoders.items()})
    return interleave(decode, rounds, steps), interleave(prefill, max(1, rounds // 3), 1), check


def logits_check(eager, onnx_logits: dict) -> dict:
    """Prefill logits of each graph against eager: max |diff| and top-1 agreement."""
    import numpy as np

    return {name: {"max_abs_diff": float(np.abs(v - eager).max()),
                   "top1_agree": float((v.argmax(-1) == eager.argmax(-1)).mean())}
            for name, v in onnx_logits.items()}  # fmt: skip


def latency_table(label: str, times: dict) -> dict:
    """Print medians and speedups over eager (ratio of medians and median of paired rounds)."""
    eager, rows, summary = statistics.median(times["eager"]), [], {}
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = statistics.median(e / t for e, t in zip(times["eager"], ts, strict=True))
        summary[name] = {"median_ms": med * 1e3, "speedup": eager / med, "paired": paired}
        rows.append([name, f"{med * 1e3:.1f}", f"{min(ts) * 1e3:.1f}", f"{max(ts) * 1e3:.1f}",
                     f"{eager / med:.2f}x", f"{paired:.2f}x"])  # fmt: skip
    print(f"\n{label}: medians over {len(times['eager'])} interleaved rounds, {THREADS} threads")
    headers = ["variant", "median ms", "min ms", "max ms", "speedup (medians)", "speedup (paired)"]
    print(m.format_table(headers, rows))
    return summary


def print_latency_goals(decode: dict) -> bool:
    """Print the decode goal against eager measured in this run."""
    quantized = {k: v for k, v in decode.items() if k.removeprefix("onnx-") in SCHEMES}
    if not quantized:
        print("SKIP: decode goal (no quantized artifact measured)")
        return False
    best = min(quantized, key=lambda k: quantized[k]["median_ms"])
    ms, speedup = quantized[best]["median_ms"], quantized[best]["speedup"]
    ok = speedup >= GOAL_DECODE_SPEEDUP
    print(f"{'PASS' if ok else 'FAIL'}: fastest quantized decode {best} {ms:.1f} ms/step is {speedup:.2f}x "
          f"faster than PyTorch eager fp32 measured here ({decode['eager']['median_ms']:.1f} ms); "
          f"goal >= {GOAL_DECODE_SPEEDUP:.0f}x")  # fmt: skip
    return ok


def run_latency(base: Path, adapter: Path, artifacts: dict, rounds: int, steps: int) -> list[bool]:
    """Load eager and the ONNX artifacts, time them interleaved, print tables, checks and goals."""
    import torch

    torch.set_num_threads(THREADS)
    model = load_eager(base, adapter)
    decoders = {name: m.OrtDecoder(path / "model.onnx", THREADS) for name, path in artifacts.items()}
    gen = torch.Generator().manual_seed(merge.SEED)
    ids = torch.randint(0, merge.BASE_CONFIG["vocab_size"], (1, PROMPT), generator=gen)
    decode, prefill, check = bench_latency(model, decoders, ids, rounds, steps)
    dec = latency_table(f"decode step, {PROMPT}-token KV cache", decode)
    latency_table(f"prefill, {PROMPT} tokens", prefill)
    for name, c in check.items():
        print(f"check: prefill logits {name} vs eager: max |diff| = {c['max_abs_diff']:.3e}, "
              f"top-1 agreement {c['top1_agree']:.1%} (random weights: near-flat logits)")  # fmt: skip
    fp32 = check.get("onnx-fp32")
    ok_fp32 = fp32 is not None and fp32["max_abs_diff"] <= 1e-3
    print(f"check: onnx-fp32 matches eager within 1e-3: {'ok' if ok_fp32 else 'FAILED'}")
    return [print_latency_goals(dec), ok_fp32]


def run_versus(python: str, base: Path, ours: dict, root: Path, rounds: int) -> list[bool]:
    """The builder's graphs of `base` beside Adaptrix's (`ours`), timed under onnxruntime-genai."""
    import torch

    if "int4-sym" not in ours:
        print("FAIL: no Adaptrix int4-sym graph to compare with the builder's int4")
        return [False]
    gen = torch.Generator().manual_seed(merge.SEED)
    prompt = torch.randint(0, merge.BASE_CONFIG["vocab_size"], (PROMPT,), generator=gen).tolist()
    print("\nonnxruntime-genai's model builder, the same base, built in this run")
    return builder.versus(python, base, ours, root, prompt, NEW_TOKENS, rounds, THREADS)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(description="Benchmark the onnx-cpu target: compile cost, latency, quality.")
    ap.add_argument("--repeat", type=int, default=3, help="cp / second-compile pairs (default 3)")
    ap.add_argument("--rounds", type=int, default=15, help="decode rounds (prefill: a third) (default 15)")
    ap.add_argument("--steps", type=int, default=3, help="decode steps per variant per round (default 3)")
    ap.add_argument("--skip-peft", action="store_true", help="do not run PEFT merge + optimum export")
    ap.add_argument("--block-size", type=int, help="int8 / int4 block size for adaptrix (default: its own)")
    ap.add_argument("--builder-python", help=f"python that imports genai's builder (${builder.PYTHON_ENV})")
    ap.add_argument("--genai-rounds", type=int, default=GENAI_ROUNDS, help="builder comparison rounds (5)")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--quality-only", action="store_true", help="only the quantization quality section")
    only.add_argument("--latency-only", action="store_true", help="compile fp32 and SCHEMES, time them")
    only.add_argument("--compile-only", action="store_true", help="first and second compiles, cp, PEFT")
    only.add_argument("--versus-builder", action="store_true",
                      help="fp32, int4, int8 compiles; the builder beside them; quality")  # fmt: skip
    ap.add_argument("--genai-schemes", default="int4-sym,int4,int8", help="schemes set beside the builder's")
    ap.add_argument("--versus-from", type=Path, help="a kept run dir: time its graphs again, then quality")
    ap.add_argument("--cache", type=Path, default=m.default_cache(), help="fixture cache dir")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (artifacts, logs)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Run the compile, latency and quality sections; print tables and PASS/FAIL lines."""
    args = parse_args(argv)
    cache = args.cache.expanduser().resolve()
    exe = merge.find_adaptrix()
    if exe is None:
        sys.exit("the `adaptrix` CLI is not installed (not on PATH)")
    print(f"machine: {os.cpu_count()} cpus, python {platform.python_version()}, {THREADS} threads")
    verdicts: list[bool] = []
    run_root = args.versus_from or Path(tempfile.mkdtemp(prefix="onnx-", dir=cache))
    try:
        skip_builder = args.compile_only or args.latency_only
        python = None if skip_builder else builder.builder_python(cache, args.builder_python)
        if args.versus_from:  # a kept run's compiles and builder graphs, timed again
            fixture = merge.ensure_fixture(cache)
            base = fixture / "base"
        elif not args.quality_only:
            fixture = merge.ensure_fixture(cache)
            base, adapter = fixture / "base", fixture / "adapter"
            repeat = 0 if args.latency_only or args.versus_builder else max(1, args.repeat)
            skip_peft = args.skip_peft or args.latency_only or args.versus_builder
            schemes = (
                () if args.compile_only else ("int8", "int4", "int4-sym") if args.versus_builder else SCHEMES
            )
            steps = run_compiles(exe, base, adapter, run_root, repeat, skip_peft, args.block_size, schemes)
            print_compile_table(steps)
            print()
            verdicts += print_compile_goals(steps)
        if not (args.quality_only or args.compile_only or args.versus_builder or args.versus_from):
            artifacts = {f"onnx-{s}": run_root / s for s in ("fp32", *SCHEMES)
                         if steps.ok("first compile fp32" if s == "fp32" else f"compile {s}")}  # fmt: skip
            verdicts += run_latency(base, adapter, artifacts, max(1, args.rounds), max(1, args.steps))
        if python is not None and not args.quality_only:
            ours = {s: run_root / s for s in args.genai_schemes.split(",")
                    if args.versus_from or steps.ok(f"compile {s}")}  # fmt: skip
            verdicts += run_versus(python, base, ours, run_root, max(1, args.genai_rounds))
        if not (args.latency_only or args.compile_only):
            print()
            verdicts += quality.run(cache, run_root, exe, python)
    finally:
        if args.keep:
            print(f"kept {run_root}")
        else:
            shutil.rmtree(run_root, ignore_errors=True)
    print(f"\nsummary: {sum(verdicts)}/{len(verdicts)} goals and checks passed")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
