"""Benchmark: routing between four domain adapters on one base, per token and per request.

Run: python benchmarks/routing.py [--cache DIR] [--json FILE] [--threads N] [--rounds N] [--no-fixture]
CPU only and offline. Trains (once, cached under CACHE/routing-v2) a small Llama on a four-alphabet
corpus and one PEFT LoRA per domain (_routing_data: lower, digits, upper, symbols, each with its own
alphabet, separator and reordering of four characters), then scores the mixed prompts of all four
domains (exact greedy answer) served by: (a) each prompt's own adapter (oracle); (b) one average
of all four (PEFT add_weighted_adapter, cat, exact); (c) token-level Arrow at top_k 1 (PEFT's
create_arrow_model, and adaptrix's hooks artifact compiled with --pass route:method=arrow);
(d) request-level routing, each prompt served by the one adapter a router picks (adaptrix.route's
prototype scoring, and nearest centroid of the base's hidden states from 8 example prompts per
domain). Then the decode overhead of the routed
hooks artifact against one attached adapter (_routing_overhead). Goals are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as m
import _routing_overhead as overhead
import _routing_score as score
import numpy as np
import torch
from _routing_data import DOMAINS
from _routing_models import build, load

CACHE_NAME = "routing-v2"
TOP_K = 1
ROUTE_PASS = f"route:method=arrow,top_k={TOP_K}"
GOAL_PICK, GOAL_OF_ORACLE, GOAL_ARROW_GAP = 0.95, 0.95, 0.1


def has_route() -> tuple[bool, bool]:
    """(adaptrix registers the route pass, adaptrix.route exists)."""
    import adaptrix
    from adaptrix.passes import PASSES

    return "route" in PASSES, hasattr(adaptrix, "route")


def compile_routed(base: Path, adapters: dict[str, Path], out: Path) -> Path:
    """The adapters as one routed hooks artifact; each adapter is named after its domain (a link's name)."""
    from adaptrix.api.compile import compile_adapter

    links = out.parent / f"{out.name}-adapters"
    links.mkdir()
    for name, path in adapters.items():
        (links / name).symlink_to(path, target_is_directory=True)
    compile_adapter([links / name for name in adapters], base, "hooks", out, dtype="float32",
                    passes=[ROUTE_PASS])  # fmt: skip
    return out


def mean(results: dict[str, np.ndarray]) -> float:
    """Accuracy over all mixed prompts (every domain has the same number)."""
    return float(np.concatenate([results[d] for d in DOMAINS]).mean())


def row(label: str, results: dict | None, note: str = "", pick: float | None = None) -> dict:
    """One table row: accuracy per domain and mixed, share routed right (request-level rows)."""
    if results is None:
        return {"label": label, "note": note}
    found = {"label": label, "domains": {d: float(results[d].mean()) for d in DOMAINS}}
    found["mixed"] = mean(results)
    return found | ({"pick": pick} if pick is not None else {}) | ({"note": note} if note else {})


def study(base: Path, adapters: dict[str, Path], work: Path) -> tuple[list[dict], dict]:
    """Every row of the accuracy table, plus checks (Arrow agreement)."""
    table = score.cross(base, adapters)
    oracle = {d: table[d][d] for d in DOMAINS}
    rows = [row("base, no adapter", score.bare(base)), row("(a) oracle: own adapter", oracle),
            row("(b) average of all four (PEFT cat, weights 1/4)", score.merged(base, adapters))]  # fmt: skip
    arrow = score.peft_arrow(base, adapters, TOP_K)
    rows.append(row(f"(c) token-level Arrow, PEFT create_arrow_model, top_k {TOP_K}", arrow))
    exact = score.peft_arrow(base, adapters, TOP_K, exact=True)
    rows.append(row(f"(c) token-level Arrow, PEFT, top_k {TOP_K}, prototypes by exact SVD (extra)", exact))
    rows.append(row("(c) token-level Arrow, PEFT, top_k 2 (extra)", score.peft_arrow(base, adapters, 2)))
    has_pass, has_api = has_route()
    checks, label = {}, f"(c) token-level Arrow, adaptrix hooks `--pass {ROUTE_PASS}`"
    routed = work / "routed"
    if has_pass:
        compile_routed(base, adapters, routed)
        mine = score.attached(load(base), routed)
        rows.append(row(label, mine))
        checks["arrow_same_answers"] = mean({d: mine[d] == arrow[d] for d in DOMAINS})
        checks["arrow_max_logit_diff"] = arrow_logit_diff(base, adapters, routed, exact=False)
        checks["arrow_exact_max_logit_diff"] = arrow_logit_diff(base, adapters, routed, exact=True)
        checks["token_picks_own_adapter"] = score.token_picks(routed, base)
    else:
        rows.append(row(label, None, "not run: the route pass is not in this checkout"))
    label = "(d) request-level, adaptrix.route (prototype scores)"
    count = score.CALIBRATION_EXAMPLES
    calibrated = f"(d) request-level, adaptrix.calibrate_route (centroids of {count} example prompts each)"
    if has_api and has_pass:
        import adaptrix
        from adaptrix.api.route import read_router

        router, model = read_router(routed), load(base)
        results, chosen = score.request_level(lambda ids: adaptrix.route(router, ids, model=model), table)
        rows.append(row(label, results, pick=score.routed_share(chosen)))
        centroids = adaptrix.calibrate_route(router, score.calibration_prompts(), model)
        results, chosen = score.request_level(lambda ids: adaptrix.route(centroids, ids, model), table)
        rows.append(row(calibrated, results, pick=score.routed_share(chosen)))
    else:
        rows.append(row(label, None, "not run: adaptrix.route is not in this checkout"))
        rows.append(row(calibrated, None, "not run: adaptrix.calibrate_route is not in this checkout"))
    return rows, checks | {"cross": {a: {d: float(v.mean()) for d, v in t.items()} for a, t in table.items()}}


@torch.inference_mode()
def arrow_logit_diff(base: Path, adapters: dict[str, Path], routed: Path, exact: bool) -> float:
    """max |logits diff|, PEFT's Arrow model against the routed hooks artifact, every domain's prompts."""
    from _routing_data import TASKS

    import adaptrix

    reference, model = score.peft_arrow_model(base, adapters, TOP_K, exact), load(base)
    worst = 0.0
    with adaptrix.attach(model, routed):
        for d in DOMAINS:
            ids = torch.from_numpy(TASKS[d].scored()[0])
            diff = reference(input_ids=ids).logits - model(input_ids=ids).logits
            worst = max(worst, diff.abs().max().item())
    return worst


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, met or missed, from the rows that ran."""
    by = {r["label"][:3]: [] for r in rows}
    for r in rows:
        if "mixed" in r:
            by[r["label"][:3]].append(r)
    oracle, average = max(by["(a)"][0]["mixed"], 1e-9), by["(b)"][0]["mixed"]
    lines = []
    for r in by["(c)"]:
        if "extra" in r["label"]:
            continue
        ok = "met" if r["mixed"] >= oracle - GOAL_ARROW_GAP and r["mixed"] > average else "missed"
        lines.append(f"goal: {r['label']}: {r['mixed']:.3f} within {GOAL_ARROW_GAP} of the oracle "
                     f"{oracle:.3f}, above the average {average:.3f}: {ok}")  # fmt: skip
    for r in by["(d)"]:
        ok = r["pick"] >= GOAL_PICK and r["mixed"] >= GOAL_OF_ORACLE * oracle and r["mixed"] > average
        lines.append(f"goal: {r['label']}: right adapter {r['pick']:.1%} >= {GOAL_PICK:.0%}, accuracy "
                     f"{r['mixed']:.3f} = {r['mixed'] / oracle:.3f} of the oracle >= {GOAL_OF_ORACLE}, "
                     f"above the average {average:.3f}: {'met' if ok else 'missed'}")  # fmt: skip
    return lines


def markdown(rows: list[dict]) -> str:
    """The accuracy table."""
    lines = [f"| serving | {' | '.join(DOMAINS)} | mixed | right adapter |"]
    lines.append("|" + "---|" * (len(DOMAINS) + 3))
    for r in rows:
        if "mixed" not in r:
            lines.append(f"| {r['label']} | {' | '.join('-' for _ in DOMAINS)} | - | {r['note']} |")
            continue
        cells = " | ".join(f"{r['domains'][d]:.2f}" for d in DOMAINS)
        pick = f"{r['pick']:.1%}" if "pick" in r else "-"
        lines.append(f"| {r['label']} | {cells} | {r['mixed']:.3f} | {pick} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(description="Score routing between four domain adapters.")
    ap.add_argument("--cache", type=Path, default=m.default_cache(),
                    help=f"cache dir (default ${m.CACHE_ENV} or ~/.cache/adaptrix-bench)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="results file (default CACHE/routing-v2/results.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the study (default 1)")
    ap.add_argument("--rounds", type=int, default=20, help="decode rounds per overhead model (default 20)")
    ap.add_argument("--steps", type=int, default=3, help="decode steps per variant per round (default 3)")
    ap.add_argument("--no-fixture", action="store_true", help="skip the overhead on merge.py's 1.1B fixture")
    ap.add_argument("--no-overhead", action="store_true", help="skip the decode overhead altogether")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    """Train or reuse the models, score every row, time the overhead, print tables and goals, write JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.cache.expanduser().resolve()
    cache, start = root / CACHE_NAME, time.perf_counter()
    print(f"models (cached under {cache})", flush=True)
    base, adapters = build(cache)
    with tempfile.TemporaryDirectory(prefix="run-", dir=cache) as tmp:
        rows, checks = study(base, adapters, Path(tmp))
        print("\naccuracy (exact greedy answer) on 64 prompts per domain, mixed = all 256\n")
        print(markdown(rows))
        lines = goals(rows)
        print("\n" + "\n".join(lines))
        for key in ("arrow_same_answers", "arrow_max_logit_diff", "arrow_exact_max_logit_diff"):
            if key in checks:
                name = key.replace("_", " ")
                print(f"check: adaptrix hooks Arrow vs PEFT Arrow, {name}: {checks[key]:.3g}")
        if "token_picks_own_adapter" in checks:
            shares = ", ".join(f"{d} {v:.0%}" for d, v in checks["token_picks_own_adapter"].items())
            print(f"token-level top-1 picks of the own domain's adapter (tokens x modules; chance "
                  f"{1 / len(DOMAINS):.0%}): {shares}")  # fmt: skip
        over = {} if args.no_overhead else run_overhead(args, root, base, adapters, Path(tmp))
    results = {"rows": rows, "goals": lines, "checks": checks, "overhead": over,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    out = args.json or cache / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out} ({results['seconds']:.0f} s)")


def run_overhead(args, root: Path, base: Path, adapters: dict[str, Path], work: Path) -> dict:
    """Decode overhead on the study's model and (if cached or --fixture) on merge.py's 1.1B fixture."""
    if not has_route()[0]:
        print("\noverhead: not run: the route pass is not in this checkout")
        return {}
    found, models = {}, [("study model", base, adapters, 1)]
    fixture = root / "llama-1.1b-bf16-lora-r16-v1"
    if not args.no_fixture and (fixture / "base").is_dir():
        fixture_adapters = overhead.derived_adapters(fixture / "adapter", work / "fixture", len(DOMAINS))
        models.append(("1.1B fixture", fixture / "base", fixture_adapters, os.cpu_count() or 1))
    for label, model_base, model_adapters, threads in models:
        print(f"\noverhead, {label} ({threads} threads)", flush=True)
        torch.set_num_threads(threads)
        from adaptrix.api.compile import compile_adapter

        single = work / f"single-{len(found)}"
        compile_adapter(next(iter(model_adapters.values())), model_base, "hooks", single, dtype="float32")
        routed = compile_routed(model_base, model_adapters, work / f"routed-{len(found)}")
        model = load(model_base)
        vocab = model.config.vocab_size
        found[label] = overhead.measure(model, single, routed, vocab, args.rounds, args.steps)
        print(overhead.goal_line(label, found[label]))
        del model
    return found


if __name__ == "__main__":
    main()
