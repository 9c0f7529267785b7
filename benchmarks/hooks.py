"""Benchmark: the hooks runtime on a 1.1B Llama in fp32 on CPU (bare base vs PEFT vs attached bundle).

Run: python benchmarks/hooks.py [--rounds N] [--prefill-rounds N] [--quick] [--json FILE]
Reuses merge.py's cached fixture (1.1B bf16 Llama base + r=16 LoRA), loaded in float32 twice:
one copy for the bare base and the attached bundle, one wrapped by PEFT (unmerged). Latencies
are interleaved round by round (base, bundle, peft, ...); medians and ratios come from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as m
import merge

PROMPT = 32
VARIANTS = ("base", "bundle", "peft")
GOAL_DECODE_OVERHEAD = 0.03
GOAL_SWITCH_MS = 50.0
OPS = ("attach (preloaded)", "attach (path)", "detach", "switch (path)", "switch (preloaded)")
LOGITS_ATOL = 1e-3  # fp32, 22 layers: the hooks fold alpha/r into B, PEFT scales after B (may round apart)


def make_second_adapter(adapter: Path, dest: Path) -> Path:
    """Copy the adapter with every lora_B scaled by -0.5: same shapes, other values."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dest)
    file = dest / "adapter_model.safetensors"
    tensors = {k: (t * -0.5 if "lora_B" in k else t).contiguous() for k, t in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    return dest


def load_models(base: Path, adapter: Path):
    """Return (bare fp32 base, a second fp32 copy wrapped by PEFT unmerged), both in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()  # noqa: E731
    return load(), PeftModel.from_pretrained(load(), adapter).eval()


def variant_ctx(model, peft_model, bundle):
    """Return ctx(name): a context manager yielding the model to run for that variant."""
    import adaptrix

    @contextlib.contextmanager
    def ctx(name: str):
        if name == "peft":
            yield peft_model
        elif name == "bundle":
            with adaptrix.attach(model, bundle):  # the handle detaches on exit
                yield model
        else:
            yield model

    return ctx


def check_logits(ctx, ids) -> dict:
    """Prefill logits: bundle vs PEFT (max abs diff), PEFT vs base, and base before/after detach."""
    import torch

    logits = []
    for name in (*VARIANTS, "base"):  # base last again: after the bundle was detached
        with ctx(name) as model, torch.inference_mode():
            logits.append(model(input_ids=ids, use_cache=False).logits.float())
    base, bundle, peft, after = logits
    return {
        "bundle_vs_peft": (bundle - peft).abs().max().item(),
        "peft_vs_base": (peft - base).abs().max().item(),
        "detached_equal": torch.equal(base, after),
    }


def interleave(ctx, call, rounds: int, steps: int, variants=VARIANTS) -> dict:
    """Rounds of base, bundle, peft: per variant an untimed call, then `steps` timed; keep the median.

    `call(name, model)` runs once and returns its own seconds. Round 0 is a warm-up, untimed. The
    untimed call after each attach keeps the first forward's fresh buffers out of the timings.
    The order of the variants rotates from round to round, so no variant always runs first.
    """
    import torch

    times = {name: [] for name in variants}
    n = len(variants)
    for r in range(rounds + 1):
        for name in variants[r % n :] + variants[: r % n]:
            with ctx(name) as model, torch.inference_mode():
                call(name, model)
                per = [call(name, model) for _ in range(steps)]
            if r:
                times[name].append(statistics.median(per))
    return times


def bench_decode(ctx, ids, rounds: int, steps: int, variants=VARIANTS) -> dict:
    """Single-token steps on a 32-token KV cache (prefilled once per variant, cropped after each step)."""
    import torch

    caches = {}
    for name in variants:
        with ctx(name) as model, torch.inference_mode():
            caches[name] = model(input_ids=ids, use_cache=True).past_key_values
    token = ids[:, -1:]

    def step(name, model) -> float:
        cache = caches[name]
        t0 = time.perf_counter()
        model(input_ids=token, past_key_values=cache, use_cache=True)
        elapsed = time.perf_counter() - t0
        cache.crop(PROMPT)  # every step sees exactly the 32-token cache
        return elapsed

    return interleave(ctx, step, rounds, steps, variants)


def bench_prefill(ctx, ids, rounds: int, variants=VARIANTS) -> dict:
    """One 32-token forward without a cache per variant per round."""

    def prefill(name, model) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t0

    return interleave(ctx, prefill, rounds, 1, variants)


def bench_ops(model, bundles: tuple, dirs: tuple, cycles: int, switches: int) -> dict:
    """Seconds per attach (preloaded Bundle, path), detach, and switch alternating two bundles."""
    import adaptrix

    out = {k: [] for k in OPS}
    for _ in range(cycles):
        for src, key in ((bundles[0], "attach (preloaded)"), (dirs[0], "attach (path)")):
            t0 = time.perf_counter()
            handle = adaptrix.attach(model, src)
            t1 = time.perf_counter()
            handle.detach()
            out[key].append(t1 - t0)
            out["detach"].append(time.perf_counter() - t1)
    for sources, key in ((dirs, "switch (path)"), (bundles, "switch (preloaded)")):
        handle = adaptrix.attach(model, sources[1])
        for i in range(switches):
            t0 = time.perf_counter()
            handle = adaptrix.switch(model, sources[i % 2])
            out[key].append(time.perf_counter() - t0)
        handle.detach()
    return out


def spread(ts: list[float]) -> list[str]:
    """Median, min and max of seconds, in ms."""
    return [f"{statistics.median(ts) * 1e3:.1f}", f"{min(ts) * 1e3:.1f}", f"{max(ts) * 1e3:.1f}"]


def latency_table(label: str, times: dict) -> dict:
    """Print one latency table with overheads over the base (ratio of medians; median paired ratio)."""
    base, rows, summary = statistics.median(times["base"]), [], {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios = [t / b - 1 for t, b in zip(ts, times["base"], strict=True)]
        paired = statistics.median(ratios)
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (paired, 0, paired)
        summary[name] = {"median_ms": med * 1e3, "overhead": med / base - 1, "paired": paired}
        summary[name]["paired_quartiles"] = [low, high]
        iqr = f"{low:+.1%} .. {high:+.1%}"
        rows.append([name, *spread(ts), f"{med / base - 1:+.1%}", f"{paired:+.1%}", iqr])
    print(f"\n{label}: medians over {len(times['base'])} interleaved rounds")
    headers = ["variant", "median ms", "min ms", "max ms", "vs base (medians)", "vs base (paired)"]
    headers.append("paired IQR")
    print(m.format_table(headers, rows))
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(description="Time the hooks runtime against a bare base and PEFT.")
    ap.add_argument("--rounds", type=int, default=30, help="decode rounds (default 30)")
    ap.add_argument("--prefill-rounds", type=int, help="prefill rounds (default: 9, at most --rounds)")
    ap.add_argument("--steps", type=int, default=2, help="decode steps per variant per round (default 2)")
    ap.add_argument("--cycles", type=int, default=5, help="attach+detach cycles (default 5)")
    ap.add_argument("--switches", type=int, default=10, help="switches per source kind (default 10)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of everything, 1 step")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--cache", type=Path, default=m.default_cache(), help="fixture cache dir")
    args = ap.parse_args(argv)
    if args.prefill_rounds is None:
        args.prefill_rounds = min(9, args.rounds)
    if args.quick:
        args.rounds = args.prefill_rounds = args.cycles = 2
        args.steps, args.switches = 1, 4
    return args


def main(argv=None) -> int:
    """Build or reuse the fixture, compile two bundles, measure, print tables, goals and checks."""
    args = parse_args(argv)
    import torch

    import adaptrix

    threads = torch.get_num_threads()  # torch's default for this machine, set explicitly
    torch.set_num_threads(threads)
    fixture = merge.ensure_fixture(args.cache.expanduser().resolve())
    base, adapter = fixture / "base", fixture / "adapter"
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__} with {threads} threads (its default), "
        f"python {platform.python_version()}; fp32 model on CPU, prompt {PROMPT} tokens"
    )
    run_root = Path(tempfile.mkdtemp(prefix="hooks-", dir=fixture.parent))
    try:
        dirs = (run_root / "bundle1", run_root / "bundle2")
        adapters = (adapter, make_second_adapter(adapter, run_root / "adapter2"))
        for src, out in zip(adapters, dirs, strict=True):
            t0 = time.perf_counter()
            adaptrix.compile_adapter(src, base, "hooks", out, force=True)
            print(f"compile {out.name}: {time.perf_counter() - t0:.1f} s, {m.dir_size_mb(out):.1f} MB")
        model, peft_model = load_models(base, adapter)
        bundles = tuple(adaptrix.load_bundle(d) for d in dirs)
        ctx = variant_ctx(model, peft_model, bundles[0])
        gen = torch.Generator().manual_seed(merge.SEED)
        ids = torch.randint(0, merge.BASE_CONFIG["vocab_size"], (1, PROMPT), generator=gen)
        check = check_logits(ctx, ids)
        decode = bench_decode(ctx, ids, max(1, args.rounds), max(1, args.steps))
        prefill = bench_prefill(ctx, ids, max(1, args.prefill_rounds))
        ops = bench_ops(model, bundles, dirs, max(1, args.cycles), max(2, args.switches))
        check["detached_equal"] &= not adaptrix.attached(model)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)

    results = {"threads": threads, "cpus": os.cpu_count(), "check": check}
    results["decode"] = dec = latency_table(f"decode step, {PROMPT}-token KV cache", decode)
    results["prefill"] = latency_table(f"prefill, {PROMPT} tokens", prefill)
    rows = [[k, len(v), *spread(v)] for k, v in ops.items()]
    print(
        "\nattach / detach / switch\n"
        + m.format_table(["operation", "runs", "median ms", "min ms", "max ms"], rows)
    )
    results["ops_median_ms"] = med_ms = {k: statistics.median(v) * 1e3 for k, v in ops.items()}

    b, p = dec["bundle"], dec["peft"]
    verdict = "met" if b["paired"] <= GOAL_DECODE_OVERHEAD else "NOT met"
    print(
        f"\ngoal: decode overhead of the bundle over the bare base, median of paired rounds "
        f"{b['paired']:+.1%} (ratio of medians {b['overhead']:+.1%}) <= {GOAL_DECODE_OVERHEAD:.0%}: "
        f"{verdict}; "
        f"PEFT unmerged: {p['overhead']:+.1%} (paired {p['paired']:+.1%})"
    )
    for key in ("switch (path)", "switch (preloaded)"):
        ok = med_ms[key] < GOAL_SWITCH_MS
        print(f"goal: {key} {med_ms[key]:.1f} ms < {GOAL_SWITCH_MS:.0f} ms: {'met' if ok else 'NOT met'}")
    ok_logits = check["bundle_vs_peft"] <= LOGITS_ATOL
    print(
        f"check: prefill logits max |bundle - peft| = {check['bundle_vs_peft']:.3e} "
        f"(tolerance {LOGITS_ATOL:.0e}): {'ok' if ok_logits else 'FAILED'}; "
        f"max |peft - base| = {check['peft_vs_base']:.3e} (non-zero: the adapter is applied)"
    )
    ok_detach = check["detached_equal"]
    print(f"check: base bit-identical after detach, nothing left attached: {'ok' if ok_detach else 'FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok_logits and ok_detach else 1


if __name__ == "__main__":
    sys.exit(main())
