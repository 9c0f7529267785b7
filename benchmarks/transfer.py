"""Benchmark: how much of an adapter's effect adaptrix's passes carry to another base (gap recovered).

Run: python benchmarks/transfer.py [--quick] [--cache DIR] [--json FILE] [--threads N] [--only TEXT]
CPU only and offline. Trains small Llama models on a synthetic character corpus, LoRA adapters
with PEFT on three tasks, then carries each source adapter (PEFT -> AIR with the source base ->
compile to the hooks target with passes onto a target base -> adaptrix.attach) and scores it by
gap recovered G = (acc_pass - acc_base) / (acc_ref - acc_base): acc_base is the target without an
adapter, acc_ref the mean accuracy of the same LoRA recipe trained directly on the target.
Accuracy is the exact match of the greedy answer. A held-out check (_transfer_heldout) scores
distill on halves of the table tasks its calibration never saw. Everything trained is cached under
CACHE/transfer-v1 by its recipe; a rerun only compiles and scores. See docs/passes.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as m
import _transfer_heldout as heldout
import _transfer_plan as plan
import torch
from _transfer_data import TASKS
from _transfer_models import accuracy, info, load

from adaptrix.ir.errors import AdaptrixError

CACHE_NAME = "transfer-v1"
GOALS = {
    "deeper": 0.99,
    "wider": 0.99,
    "further-short": 0.8,
    "further-same": 0.8,
    "further": 0.8,
    "independent": 0.27,
}
MIN_GAP = 0.5  # a reference that gains less than this over the bare base did not learn: G is undefined
SVD_ALIGNED = ["project:method=svd,source={source}"]
# refit's calibration: the task's prompts (training draws, no answers), continued by the adapted source
REFIT = ["refit:source={source},prompts={prompts},generate={generate}"]
REFIT_LABEL = "refit:source=SOURCE,prompts=TASK"
# distill: the same calibration; the adapter trained on the target against the adapted source's answers
DISTILL = ["distill:source={source},prompts={prompts},generate={generate},steps=300"]
DISTILL_LABEL = "distill:source=SOURCE,prompts=TASK,steps=300 (trains)"
CALIBRATION_PROMPTS, CALIBRATION_SEED = 512, 4321
HELDOUT = [("no pass (identity map)", []), (DISTILL_LABEL, DISTILL)]  # rows of the held-out check
# (target, label, passes, role): role "pass" is judged against the target's goal; "control" is not.
ROWS = [
    ("source", "AIR, no pass (exactness check)", [], "control"),
    ("source", "reduce-rank:rank=4", ["reduce-rank:rank=4"], "pass"),
    ("source", "reduce-rank:energy=0.9", ["reduce-rank:energy=0.9"], "pass"),
    ("source", "project:method=svd,source=SOURCE (onto itself)", SVD_ALIGNED, "control"),
    ("deeper", "no pass (naive: ops stay on layers 0-3)", [], "control"),
    ("deeper", "redistribute:layers=0,2,4,6", ["redistribute:layers=0,2,4,6"], "pass"),
    ("deeper", "redistribute (relative depth)", ["redistribute"], "pass"),
    ("wider", "project:method=truncate", ["project:method=truncate"], "pass"),
    ("wider", "project:method=svd", ["project:method=svd"], "pass"),
    ("wider", "project:method=interpolate (naive)", ["project:method=interpolate"], "control"),
    ("further-short", "no pass (identity map)", [], "pass"),
    ("further-short", "project:method=svd,source=SOURCE", SVD_ALIGNED, "pass"),
    ("further-short", REFIT_LABEL, REFIT, "pass"),
    ("further-same", "no pass (identity map)", [], "pass"),
    ("further-same", "project:method=svd", ["project:method=svd"], "pass"),
    ("further-same", "project:method=svd,source=SOURCE", SVD_ALIGNED, "pass"),
    ("further-same", REFIT_LABEL, REFIT, "pass"),
    ("further-same", DISTILL_LABEL, DISTILL, "pass"),
    ("further", "no pass (identity map)", [], "pass"),
    ("further", "project:method=svd", ["project:method=svd"], "pass"),
    ("further", "project:method=svd,source=SOURCE", SVD_ALIGNED, "pass"),
    ("further", REFIT_LABEL, REFIT, "pass"),
    ("further", DISTILL_LABEL, DISTILL, "pass"),
    ("independent", "no pass (identity map, naive)", [], "control"),
    ("independent", "project:method=svd", ["project:method=svd"], "pass"),
    ("independent", "project:method=svd,source=SOURCE", SVD_ALIGNED, "pass"),
    ("independent", REFIT_LABEL, REFIT, "pass"),
    ("independent", DISTILL_LABEL, DISTILL, "pass"),
]


def missing_passes(passes: list[str]) -> list[str]:
    """Names in `passes` that adaptrix does not register (yet)."""
    from adaptrix.passes import PASSES

    return [name for name in (text.partition(":")[0] for text in passes) if name not in PASSES]


def carried_accuracy(air: Path, base: Path, model, passes: list[str], task, work: Path, subsets=(None,)):
    """Compile the AIR adapter for `base` through `passes` into a hooks bundle, attach it, score it.

    One accuracy per entry of `subsets`: the scored set (None) or a list of (prompt, answer) pairs.
    """
    import adaptrix
    from adaptrix.api.compile import compile_adapter

    out = Path(tempfile.mkdtemp(prefix="bundle-", dir=work)) / "bundle"
    compile_adapter(air, base, "hooks", out, dtype="float32", passes=passes)
    handle = adaptrix.attach(model, out)
    try:
        return [accuracy(model, task, pairs) for pairs in subsets]
    finally:
        handle.detach()


def peft_accuracy(base: Path, adapter: Path, task) -> float:
    """A PEFT adapter on its own base (unmerged), scored."""
    from peft import PeftModel

    return accuracy(PeftModel.from_pretrained(load(base), adapter).eval(), task)


def calibration_prompts(work: Path, tasks) -> dict[str, Path]:
    """Per task, a JSON file of training-draw prompts without answers (rev's held-out words excluded)."""
    import numpy as np
    from _transfer_data import BOS, encode

    files = {}
    for task in tasks:
        drawn = TASKS[task].examples(np.random.default_rng(CALIBRATION_SEED), CALIBRATION_PROMPTS)
        files[task] = work / f"prompts-{task}.json"
        files[task].write_text(json.dumps([[BOS, *encode(prompt)] for prompt, _ in drawn]))
    return files


def make_airs(bases, adapters, scale, work: Path) -> dict:
    """Each source adapter as an AIR file (PEFT -> AIR with the source base), by (task, seed)."""
    from adaptrix import convert_adapter

    airs = {}
    for task in scale.tasks:
        for s in range(scale.seeds):
            airs[task, s] = work / f"{task}-s{s}.air"
            convert_adapter(adapters["source", task, s], "air", airs[task, s], base=bases["source"])
    return airs


def score_rows(bases, adapters, airs, scale, work: Path, only: str | None = None) -> tuple[dict, list[dict]]:
    """Accuracies of bases and references, then every row's accuracy and G per task and seed."""
    models = {name: load(path) for name, path in bases.items()}
    anchors = {}
    for name, model in models.items():
        for task in scale.tasks:
            refs = [peft_accuracy(bases[name], adapters[name, task, s], TASKS[task])
                    for s in range(scale.seeds if name == "source" else scale.ref_seeds)]  # fmt: skip
            anchors[name, task] = {
                "base": accuracy(model, TASKS[task]),
                "ref": statistics.fmean(refs),
                "refs": refs,
            }
    rows, prompts = [], calibration_prompts(work, scale.tasks)
    for target, label, passes, role in ROWS:
        if only is not None and only not in label:
            continue
        row = {"target": target, "label": label, "role": role, "passes": passes, "tasks": {}}
        rows.append(row)
        missing = missing_passes(passes)
        if missing:
            row["note"] = f"pass not available: {', '.join(missing)}"
            print(f"  {target:12s} {label}: skipped ({row['note']})", flush=True)
            continue
        try:
            row["tasks"] = {}
            for task in scale.tasks:
                values = {
                    "source": bases["source"],
                    "prompts": prompts[task],
                    "generate": TASKS[task].answer_len + 1,
                }
                specs = [text.format(**values) for text in passes]
                row["tasks"][task] = score_task(airs, bases, models, anchors, target, specs, task, work)
        except AdaptrixError as exc:
            row["note"] = f"failed: {exc.line()}"
            print(f"  {target:12s} {label}: {row['note']}", flush=True)
            continue
        cells = ", ".join(f"{task} G {g_cell(result['G'])}" for task, result in row["tasks"].items())
        print(f"  {target:12s} {label}: {cells}", flush=True)
    return {f"{n}/{t}": v for (n, t), v in anchors.items()}, rows


def score_task(airs, bases, models, anchors, target: str, specs: list[str], task: str, work: Path) -> dict:
    """One row's accuracy, G and kept share for one task, per source seed."""
    anchor, own = anchors[target, task], anchors["source", task]
    accs = [carried_accuracy(airs[task, s], bases[target], models[target], specs, TASKS[task], work)[0]
            for s in range(len(own["refs"]))]  # fmt: skip
    gap = anchor["ref"] - anchor["base"]
    gains = [(acc - anchor["base"]) / gap for acc in accs] if gap >= MIN_GAP else None
    kept = [(acc - anchor["base"]) / (mine - own["base"]) if mine > own["base"] else None
            for acc, mine in zip(accs, own["refs"], strict=True)]  # fmt: skip
    return {"acc": accs, "G": gains, "kept": None if None in kept else kept}


def g_cell(gains: list[float] | None) -> str:
    """Mean G over seeds, and the range when there are several."""
    if gains is None:
        return "n/a"
    text = f"{statistics.fmean(gains):.2f}"
    return text if len(gains) == 1 else f"{text} [{min(gains):.2f}, {max(gains):.2f}]"


def table(rows: list[dict], tasks: tuple[str, ...]) -> str:
    """The markdown table: target x pass, G per task (mean [min, max] over seeds), means, goal."""
    lines = [f"| target | pass | {' | '.join(f'G {t}' for t in tasks)} | mean G | mean kept | goal |",
             "|" + "---|" * (len(tasks) + 5)]  # fmt: skip
    for row in rows:
        if "note" in row:
            cells, means, verdict = ["-"] * len(tasks), "- | -", row["note"]
        else:
            cells = [g_cell(row["tasks"][t]["G"]) for t in tasks]
            mean_g, mean_kept = (task_mean(row, tasks, key) for key in ("G", "kept"))
            verdict = "n/a" if mean_g is None else verdict_for(row, mean_g)
            means = " | ".join("n/a" if v is None else f"{v:.2f}" for v in (mean_g, mean_kept))
        lines.append(f"| {row['target']} | {row['label']} | {' | '.join(cells)} | {means} | {verdict} |")
    return "\n".join(lines)


def task_mean(row: dict, tasks: tuple[str, ...], key: str) -> float | None:
    """The mean over tasks of the per-task mean over seeds, skipping tasks where it is undefined."""
    means = [statistics.fmean(row["tasks"][t][key]) for t in tasks if row["tasks"][t][key] is not None]
    return statistics.fmean(means) if means else None


def verdict_for(row: dict, mean_g: float) -> str:
    """Whether a pass row meets its target's goal (controls and source rows have none)."""
    goal = GOALS.get(row["target"])
    if row["role"] == "control" or goal is None:
        return "control" if row["role"] == "control" else "-"
    return f"{'meets' if mean_g >= goal else 'misses'} >= {goal}"


def anchor_table(anchors: dict, tasks: tuple[str, ...]) -> str:
    """acc_base (zero adapter) and acc_ref per base and task."""
    lines = [f"| base | {' | '.join(f'{t} base / ref' for t in tasks)} |", "|" + "---|" * (len(tasks) + 1)]
    for name in ("source", *plan.TARGETS):
        cells = [f"{anchors[f'{name}/{t}']['base']:.2f} / {anchors[f'{name}/{t}']['ref']:.2f}" for t in tasks]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(description="Score adaptrix's carrying passes by gap recovered.")
    ap.add_argument("--quick", action="store_true", help="smoke run: short training, one task, one seed")
    ap.add_argument("--cache", type=Path, default=m.default_cache(),
                    help=f"cache dir (default ${m.CACHE_ENV} or ~/.cache/adaptrix-bench)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="results file (default CACHE/transfer-v1/results[-quick].json)")
    ap.add_argument(
        "--only", help="score only the rows whose label contains this text (JSON: results-only.json)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: tiny models, shared cores)"
    )
    return ap.parse_args(argv)


def main(argv=None) -> None:
    """Train or reuse the models, score every row, print the tables and write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = plan.QUICK if args.quick else plan.FULL
    cache = args.cache.expanduser().resolve() / CACHE_NAME
    start = time.perf_counter()
    print(f"bases (cached under {cache})", flush=True)
    bases = plan.build_bases(cache, scale)
    checks = plan.growth_checks(bases)
    for name, diff in checks.items():
        print(
            f"check: {name} base vs source logits max |diff| = {diff:.1e} (tolerance {plan.GROWTH_TOLERANCE})"
        )
        if diff > plan.GROWTH_TOLERANCE:
            sys.exit(f"the {name} base does not compute what the source computes")
    drifts = plan.drift(bases)
    print("drift from the source (mean relative Frobenius distance of the layers' matrices): "
          + ", ".join(f"{name} {value:.2f}" for name, value in drifts.items()))  # fmt: skip
    print("adapters", flush=True)
    adapters = plan.build_adapters(cache, scale, bases)
    trained = time.perf_counter()
    print("rows", flush=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=cache) as work:
        airs = make_airs(bases, adapters, scale, Path(work))
        anchors, rows = score_rows(bases, adapters, airs, scale, Path(work), args.only)
        chosen = [(label, passes) for label, passes in HELDOUT if args.only is None or args.only in label]

        def score(air, base, model, specs, task, subsets):
            return carried_accuracy(air, base, model, specs, task, Path(work), subsets)

        calibration, held = (CALIBRATION_PROMPTS, CALIBRATION_SEED), []
        if chosen:
            held = heldout.rows(bases, adapters, airs, scale, chosen, score, calibration, Path(work))
    done = time.perf_counter()
    print("\naccuracy (exact greedy answer) without adapter / with the reference LoRA trained on the base\n")
    print(anchor_table(anchors, scale.tasks))
    print(f"\ngap recovered G, mean [min, max] over {scale.seeds} source adapter seed(s)\n")
    print(table(rows, scale.tasks))
    if held:
        print("\nheld-out halves: calibrated on one half of the task's scored set, G on the other half\n")
        print(heldout.table(held))
    uncached = sum(info(path)["seconds"] for path in [*bases.values(), *adapters.values()])
    timing = {"train_s": round(trained - start, 1), "score_s": round(done - trained, 1),
              "total_s": round(done - start, 1), "training_when_built_s": round(uncached, 1)}  # fmt: skip
    print(f"\ntime: {timing['total_s']:.0f} s (training or cache {timing['train_s']:.0f} s, "
          f"scoring {timing['score_s']:.0f} s), {args.threads} threads; building what this run used took "
          f"{uncached:.0f} s of training when it was not cached")  # fmt: skip
    name = "results-quick.json" if args.quick else "results-only.json" if args.only else "results.json"
    out = args.json or cache / name
    results = {"scale": vars(scale) | {"tasks": list(scale.tasks)}, "growth_checks": checks, "drift": drifts,
               "anchors": anchors, "rows": rows, "heldout_rows": held, "timing": timing,
               "bases": {k: str(v) for k, v in bases.items()}}  # fmt: skip
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
