"""The routing study's decode overhead: base, base + one hooks adapter, base + the routed hooks artifact.

One decode step on a 32-token KV cache (hooks.py's bench_decode: rounds interleaved, order rotating,
medians). Overhead of a variant = its median step minus the base's, both from this run; the goal is
routed overhead <= 2x the single adapter's. Two models: the study's small decoder with its four
domain adapters, and merge.py's 1.1B fixture with four r=16 adapters derived from its adapter
(each its own A and B: the fixture's, rolled along the input features and sign-flipped), where the
per-token matmuls dominate as they would in serving.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
from pathlib import Path

import hooks
import torch

VARIANTS = ("base", "single", "routed")
GOAL_RATIO = 2.0


def derived_adapters(adapter: Path, dest: Path, count: int) -> dict[str, Path]:
    """`count` adapters of the same shapes as `adapter`, each with other A and B values."""
    from safetensors.torch import load_file, save_file

    found = {}
    tensors = load_file(adapter / "adapter_model.safetensors")
    for i in range(count):
        out = dest / f"adapter{i}"
        shutil.copytree(adapter, out)
        changed = {}
        for key, t in tensors.items():
            t = torch.roll(t, 7 * i, dims=1) if "lora_A" in key else t * (-1.0) ** i
            changed[key] = t.contiguous()
        save_file(changed, out / "adapter_model.safetensors", metadata={"format": "pt"})
        found[f"a{i}"] = out
    return found


def variant_ctx(model, single: Path, routed: Path):
    """ctx(name): the model with nothing, the single bundle, or the routed artifact attached."""
    import adaptrix

    @contextlib.contextmanager
    def ctx(name: str):
        if name == "base":
            yield model
            return
        with adaptrix.attach(model, single if name == "single" else routed):
            yield model

    return ctx


def measure(model, single: Path, routed: Path, vocab: int, rounds: int, steps: int) -> dict:
    """Decode-step medians per variant, overheads over the base and the routed / single ratio."""
    ctx = variant_ctx(model, single, routed)
    ids = torch.randint(3, vocab, (1, hooks.PROMPT), generator=torch.Generator().manual_seed(0))
    times = hooks.bench_decode(ctx, ids, rounds, steps, VARIANTS)
    summary = hooks.latency_table(f"decode step, {hooks.PROMPT}-token KV cache", times)
    base = statistics.median(times["base"])
    over = {name: statistics.median(times[name]) - base for name in ("single", "routed")}
    paired = {name: statistics.median([t - b for t, b in zip(times[name], times["base"], strict=True)])
              for name in ("single", "routed")}  # fmt: skip
    ratio = over["routed"] / over["single"] if over["single"] > 0 else float("inf")
    paired_ratio = paired["routed"] / paired["single"] if paired["single"] > 0 else float("inf")
    return {"summary": summary, "overhead_ms": {k: v * 1e3 for k, v in over.items()},
            "paired_overhead_ms": {k: v * 1e3 for k, v in paired.items()}, "ratio": ratio,
            "paired_ratio": paired_ratio, "rounds": rounds, "steps": steps}  # fmt: skip


def goal_line(label: str, result: dict) -> str:
    """The goal line of one model's overhead measurement."""
    over, ratio = result["overhead_ms"], result["ratio"]
    verdict = "met" if ratio <= GOAL_RATIO else "missed"
    return (f"goal: {label}: routed overhead {over['routed']:.2f} ms / single adapter "
            f"{over['single']:.2f} ms = {ratio:.2f}x (median of paired rounds "
            f"{result['paired_ratio']:.2f}x) <= {GOAL_RATIO:.0f}x: {verdict}")  # fmt: skip


__all__ = ["derived_adapters", "goal_line", "measure"]
