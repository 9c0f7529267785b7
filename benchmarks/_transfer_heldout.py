"""transfer.py's held-out check: distill calibrated on one half of a table task, scored on the other.

kv's scored set is its whole table and mod's all 289 pairs, so the main rows calibrate refit and
distill on the very prompts they are then scored on (without their answers). Here each of those
tasks' scored set is split into two halves (seeded): the calibration's prompts are drawn from one
half only and accuracy is measured on the other, on the independent target, with no pass and
with distill. rev needs no such check: its scored words are never in a calibration.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from _transfer_data import BOS, TASKS, encode
from _transfer_models import accuracy, load

SPLIT_SEED = 7
TARGET = "independent"
SPLIT_TASKS = ("kv", "mod")


def split(task: str) -> tuple[list, list]:
    """The task's scored set in two seeded halves: (calibrated on, scored on)."""
    pairs = TASKS[task].examples()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pairs))
    half = len(pairs) // 2
    return [pairs[i] for i in order[:half]], [pairs[i] for i in order[half:]]


def prompts_file(pairs: list, count: int, seed: int, path: Path) -> Path:
    """`count` prompts drawn from `pairs` (with <bos>, without answers) as JSON token ids."""
    drawn = np.random.default_rng(seed).integers(0, len(pairs), count)
    path.write_text(json.dumps([[BOS, *encode(pairs[i][0])] for i in drawn]))
    return path


def rows(bases, adapters, airs, scale, rows_spec: list, score, calibration: tuple, work: Path) -> list:
    """One row per (label, passes) of `rows_spec`: G on the held-out half of kv and mod, per source seed.

    `score(air, base, model, passes, task, subsets)` is the main study's carried accuracy, one per
    subset of (prompt, answer) pairs, from one compile.
    """
    from peft import PeftModel

    model, found = load(bases[TARGET]), []
    tasks = [t for t in SPLIT_TASKS if t in scale.tasks]
    halves = {t: split(t) for t in tasks}
    files = {t: prompts_file(halves[t][0], *calibration, work / f"heldout-{t}.json") for t in tasks}
    anchors = {}
    for t in tasks:
        references = [PeftModel.from_pretrained(load(bases[TARGET]), adapters[TARGET, t, s]).eval()
                      for s in range(scale.ref_seeds)]  # fmt: skip
        refs = [accuracy(reference, TASKS[t], halves[t][1]) for reference in references]
        anchors[t] = {"base": accuracy(model, TASKS[t], halves[t][1]), "ref": statistics.fmean(refs)}
    for label, passes in rows_spec:
        row = {"target": TARGET, "label": label, "passes": passes, "tasks": {}}
        for t in tasks:
            values = {"source": bases["source"], "prompts": files[t], "generate": TASKS[t].answer_len + 1}
            specs = [text.format(**values) for text in passes]
            accs, seen = [], []
            for s in range(scale.seeds):
                held, calibrated = score(airs[t, s], bases[TARGET], model, specs, TASKS[t], halves[t][::-1])
                accs.append(held)
                seen.append(calibrated)
            gap = anchors[t]["ref"] - anchors[t]["base"]
            row["tasks"][t] = {"acc": accs, "acc_calibrated_half": seen, **anchors[t],
                               "G": [(a - anchors[t]["base"]) / gap for a in accs]}  # fmt: skip
        found.append(row)
    return found


def table(found: list) -> str:
    """Markdown: G on the held-out half (mean [min, max] over seeds), and accuracy on the calibrated half."""
    lines = ["| target | pass | task | base / ref (held-out half) | G held-out half | acc. calibrated half |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in found:
        for t, r in row["tasks"].items():
            g, seen = r["G"], r["acc_calibrated_half"]
            lines.append(f"| {row['target']} | {row['label']} | {t} | {r['base']:.2f} / {r['ref']:.2f} | "
                         f"{statistics.fmean(g):.2f} [{min(g):.2f}, {max(g):.2f}] | "
                         f"{statistics.fmean(seen):.2f} |")  # fmt: skip
    return "\n".join(lines)
