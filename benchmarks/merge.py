"""Benchmark: merge an r=16 LoRA into a 1.1B bf16 Llama base (cp vs PEFT vs adaptrix).

Run: python benchmarks/merge.py [--repeat N] [--cache DIR] [--skip-peft] [--skip-quantized]
The base model and adapter are built once into the cache (outside the repo) and reused; so is
the base quantized to NF4 (_quantized_base.py), whose merge (adaptrix-nf4) is timed beside.
Each step runs in its own child; peak RSS includes the child's descendants and has a floor
of about 8 MB (the small launcher that _measure uses to time the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as m
import _quantized_base as qb

FIXTURE = "llama-1.1b-bf16-lora-r16-v1"
SEED = 1234
BASE_CONFIG = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPOT_TENSOR = "model.layers.0.self_attn.q_proj.weight"
GOAL_WALL_RATIO = 1.5
GOAL_RSS_MB = 600.0
GOAL_QUANTIZED_RATIO = 1.5  # the merge from the NF4 base against the merge from the bf16 base

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out, max_shard_size="1GB")
"""


def build_base(dest: Path):
    """Build the seeded bf16 Llama base without slow init and save it sharded; return the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**BASE_CONFIG, dtype=torch.bfloat16)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    torch.set_default_dtype(torch.float32)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="1GB")
    _add_torch_dtype_key(dest / "config.json")
    return model


def _add_torch_dtype_key(config_path: Path) -> None:
    """Write the legacy torch_dtype key next to the newer dtype key for older readers."""
    cfg = json.loads(config_path.read_text())
    cfg.setdefault("torch_dtype", "bfloat16")
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_adapter(model, dest: Path) -> None:
    """Attach a randomly initialised r=16 LoRA with PEFT and save it."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED + 1)
    cfg = LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(model, cfg).save_pretrained(dest)


def build_fixture(dest: Path) -> None:
    """Build base/ and adapter/ under dest (runs inside the measured build child)."""
    dest.mkdir(parents=True, exist_ok=True)
    model = build_base(dest / "base")
    build_adapter(model, dest / "adapter")


def ensure_fixture(cache: Path) -> Path:
    """Return the cached fixture dir, building it in a child process if it is missing."""
    final = cache / FIXTURE
    if (final / "base").is_dir() and (final / "adapter").is_dir():
        print(f"fixture: reusing {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".building-{FIXTURE}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{FIXTURE}-", dir=cache))
    print(f"fixture: building 1.1B bf16 base + r=16 adapter into {tmp} (one time)")
    log = cache / f"{FIXTURE}-build.log"
    s = m.run_measured([sys.executable, str(Path(__file__).resolve()), "--_build-into", str(tmp)], log)
    if s.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"fixture build failed (rc={s.returncode}):\n{m.log_tail(log)}")
    os.rename(tmp, final)
    print(
        f"fixture: built in {s.wall_s:.1f} s, peak RSS {s.peak_rss_mb:.0f} MB, "
        f"base {m.dir_size_mb(final / 'base'):.0f} MB, "
        f"adapter {m.dir_size_mb(final / 'adapter'):.1f} MB"
    )
    return final


def strs(*paths: Path) -> list[str]:
    """Return the paths as strings."""
    return [str(p) for p in paths]


def find_adaptrix() -> str | None:
    """Return the adaptrix CLI next to this python (no pyenv shim hop), else on PATH, else None."""
    sibling = Path(sys.executable).parent / "adaptrix"
    return str(sibling) if os.access(sibling, os.X_OK) else shutil.which("adaptrix")


def adaptrix_argv(exe: str, adapter: Path, base: Path, out: Path) -> list[str]:
    """Return the adaptrix compile command line."""
    target = ["--target", "merged"]
    return [exe, "compile", str(adapter), "--base", str(base), *target, "-o", str(out), "--force"]


def commands(base: Path, adapter: Path, skip_peft: bool, nf4: Path | None = None) -> dict:
    """Return name -> (function(out_dir) -> argv, extra environment) for the steps that can run.

    `nf4`: the base quantized to NF4; its merge (dequantized, bf16 out) is step adaptrix-nf4.
    """
    steps = {
        "cp": (lambda out: ["cp", "-r", str(base), str(out)], None),
        "cp+sync": (lambda out: ["sh", "-c", f'cp -r "{base}" "{out}" && sync'], None),
    }
    if skip_peft:
        print("peft: skipped (--skip-peft)")
    else:
        steps["peft"] = (lambda out: [sys.executable, "-c", PEFT_SCRIPT, *strs(base, adapter, out)], None)
    exe = find_adaptrix()
    if exe is None:
        print("adaptrix: SKIPPED - the `adaptrix` CLI is not installed (not on PATH)")
        return steps
    # First compile for a base: every input hashed for the manifest. Repeat compile: the base's
    # hashes come from adaptrix's hash cache (the adapter is still hashed), as for a second adapter.
    no_cache = {**os.environ, "ADAPTRIX_HASH_CACHE": "0"}
    steps["adaptrix-first"] = (lambda out: adaptrix_argv(exe, adapter, base, out), no_cache)
    steps["adaptrix"] = (lambda out: adaptrix_argv(exe, adapter, base, out), None)
    if nf4 is not None:
        steps["adaptrix-nf4"] = (lambda out: adaptrix_argv(exe, adapter, nf4, out), None)
    return steps


def prepare_page_cache(base: Path, mode: str) -> str:
    """Before a timed run: drop the page cache (cold) or read the base into it (warm)."""
    if mode == "cold":
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "cold"
        except OSError:
            mode = "warm"  # not allowed here: fall back, and say so in the table
    m.warm_page_cache(base)
    return mode


def run_all(steps: dict, inputs: dict, run_root: Path, repeat: int, cache_mode: str) -> tuple[dict, dict]:
    """Run every step repeat times (interleaved); return summaries and last-run output sizes.

    `inputs`: the base each step reads (its page cache is dropped or warmed before the step)."""
    results = {name: m.Summary(name) for name in steps}
    sizes = {}
    for name in ("adaptrix", "adaptrix-nf4"):  # fill adaptrix's hash cache for repeat compiles, untimed
        if name in steps:
            argv_for, _ = steps[name]
            m.run_measured(argv_for(run_root / "warmup"), run_root / "warmup.log")
            m.remove_and_sync(run_root / "warmup")
    os.sync()  # flush the fixture build's dirty pages so writeback does not skew the first run
    for i in range(repeat):
        for name, (argv_for, env) in steps.items():
            state = prepare_page_cache(inputs[name], cache_mode)
            out, log = run_root / name, run_root / f"{name}.log"
            s = m.run_measured(argv_for(out), log, env=env)
            print(
                f"  repeat {i + 1}/{repeat} {name:<15} wall {s.wall_s:7.2f} s  "
                f"peak RSS {s.peak_rss_mb:8.0f} MB  rc {s.returncode}  page cache {state}"
            )
            if s.returncode != 0:
                print(f"  {name} failed, log tail:\n{m.log_tail(log)}")
            results[name].samples.append(s)
            sizes[name] = m.dir_size_mb(out) if out.exists() else 0.0
            if i < repeat - 1 or name.startswith("cp") or s.returncode != 0:
                m.remove_and_sync(out)
    return results, sizes


def print_table(results: dict, sizes: dict) -> None:
    """Print the summary table with ratios against cp."""
    cp = results["cp"]
    rows = []
    for r in results.values():
        ok = all(s.returncode == 0 for s in r.samples)
        rows.append(
            [
                r.name,
                f"{r.median_wall_s:.2f}",
                f"{r.max_rss_mb:.0f}",
                f"{r.median_wall_s / cp.median_wall_s:.2f}",
                f"{r.max_rss_mb / cp.max_rss_mb:.1f}",
                f"{sizes.get(r.name, 0):.0f}",
                "ok" if ok else "FAILED",
            ]
        )
    print(
        m.format_table(
            ["name", "median wall s", "peak RSS MB", "wall x cp", "RSS x cp", "out MB", "status"],
            rows,
        )
    )


def print_goals(results: dict) -> None:
    """Print the adaptrix goal lines against the plain copy (never asserts)."""
    cp = results["cp"].median_wall_s
    for name in ("adaptrix-first", "adaptrix"):
        a = results.get(name)
        if a is None:
            print(f"{name}: skipped, no goal measured")
            continue
        if any(s.returncode != 0 for s in a.samples):
            print(f"{name}: FAILED (a run exited non-zero), no goal measured")
            continue
        ratio = a.median_wall_s / cp
        print(
            f"{name} wall / cp wall = {ratio:.2f} (goal <= {GOAL_WALL_RATIO}) "
            f"{'met' if ratio <= GOAL_WALL_RATIO else 'NOT met'}; "
            f"peak RSS = {a.max_rss_mb:.0f} MB (goal <= {GOAL_RSS_MB:.0f}) "
            f"{'met' if a.max_rss_mb <= GOAL_RSS_MB else 'NOT met'}"
        )


def print_quantized_goal(results: dict) -> None:
    """Print the merge from the NF4 base against the merge from the bf16 base (wall, peak RSS)."""
    a, q = results.get("adaptrix"), results.get("adaptrix-nf4")
    if a is None or q is None or any(s.returncode != 0 for s in (*a.samples, *q.samples)):
        print("adaptrix-nf4: not measured (skipped or failed)")
        return
    wall, rss = q.median_wall_s / a.median_wall_s, q.max_rss_mb / a.max_rss_mb
    met = wall <= GOAL_QUANTIZED_RATIO and rss <= GOAL_QUANTIZED_RATIO
    print(f"adaptrix-nf4 / adaptrix (bf16 base): wall {wall:.2f}, peak RSS {rss:.2f} "
          f"(goal <= {GOAL_QUANTIZED_RATIO} each) {'met' if met else 'NOT met'}")  # fmt: skip


def spot_check(base: Path, run_root: Path) -> None:
    """Compare one merged tensor between the adaptrix and PEFT outputs (and against the base)."""
    import torch

    a, p, b = (m.load_tensor(d, SPOT_TENSOR) for d in (run_root / "adaptrix", run_root / "peft", base))
    if p is not None and b is not None:
        print(
            f"spot check {SPOT_TENSOR}: peft output dtype {p.dtype}, max |peft - base| = "
            f"{(p.float() - b.float()).abs().max().item():.3e} (non-zero: adapter applied)"
        )
    if a is None or p is None:
        print(f"spot check {SPOT_TENSOR}: adaptrix vs peft skipped (needs both outputs)")
        return
    diff = (a.float() - p.float()).abs()
    print(
        f"spot check {SPOT_TENSOR}: adaptrix {a.dtype} vs peft {p.dtype}, "
        f"max |diff| = {diff.max().item():.3e}, "
        f"differing elements = {int((diff > 0).sum())}/{diff.numel()}"
    )
    if a.dtype == p.dtype == torch.bfloat16:
        print(f"spot check: max distance = {m.max_bf16_ulps(a, p)} bf16 ulp (expect 0 or 1)")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(
        description="Time cp vs PEFT vs adaptrix merging an r=16 LoRA "
        "into a 1.1B bf16 Llama base (peak RSS included)."
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per step; median wall, max RSS (default 3)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=m.default_cache(),
        help=f"fixture cache dir (default ${m.CACHE_ENV} or ~/.cache/adaptrix-bench)",
    )
    ap.add_argument("--skip-peft", action="store_true", help="do not run the PEFT reference merge")
    ap.add_argument("--skip-quantized", action="store_true",
                    help="do not time the merge from the base quantized to NF4 (built once)")  # fmt: skip
    ap.add_argument(
        "--page-cache",
        choices=("cold", "warm"),
        default="cold",
        help="drop the page cache before each run (cold, the default; needs root) or read the "
        "base into it first (warm)",
    )
    ap.add_argument("--_build-into", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    """Build or reuse the fixture, run every step, print the table, goals and spot check."""
    args = parse_args(argv)
    if args._build_into:
        return build_fixture(args._build_into)
    cache = args.cache.expanduser().resolve()
    fixture = ensure_fixture(cache)
    base, adapter = fixture / "base", fixture / "adapter"
    print(
        f"machine: {os.cpu_count()} cpus, python {platform.python_version()}, "
        f"base {m.dir_size_mb(base):.0f} MB, page cache {args.page_cache} before each run"
    )
    nf4 = None if args.skip_quantized else qb.ensure_nf4(fixture)
    steps = commands(base, adapter, args.skip_peft, nf4)
    inputs = {name: nf4 if name == "adaptrix-nf4" else base for name in steps}
    run_root = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    try:
        results, sizes = run_all(steps, inputs, run_root, max(1, args.repeat), args.page_cache)
        print()
        print_table(results, sizes)
        print()
        print_goals(results)
        print_quantized_goal(results)
        spot_check(base, run_root)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)


if __name__ == "__main__":
    main()
