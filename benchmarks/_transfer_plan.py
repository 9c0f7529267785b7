"""The transfer study's recipes: which bases and adapters it trains, at full size or --quick.

Bases: the source; `further-same` and `further`, the source trained on for half its steps again at a
third of its peak learning rate, on the same corpus mix and on a shifted one; `further-short`, an
eighth of its steps again on the same mix;
`independent`, the source's recipe with another seed; `deeper` and `wider`, grown from the source
without training (_transfer_grow). Adapters: one LoRA recipe per task, trained with PEFT on the
source (the adapters that are carried) and on every target (the references).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from _transfer_data import TASKS, VOCAB
from _transfer_grow import grow_deeper, grow_wider, max_logit_diff, save_grown, wider_config
from _transfer_models import MIX, SHIFTED_MIX, SOURCE_CONFIG, cached, load, train_base, train_lora

GROWTH_TOLERANCE = 1e-4  # max |logits diff| of a grown base against the source (fp32)
TARGETS = ("deeper", "wider", "further-short", "further-same", "further", "independent")


@dataclass(frozen=True)
class Scale:
    """How much the study trains: steps per base, steps per task's adapter, seeds, tasks."""

    base_steps: int
    lora_steps: dict[str, int]
    seeds: int
    ref_seeds: int
    tasks: tuple[str, ...]


FULL = Scale(1200, {"kv": 150, "mod": 500, "rev": 800}, seeds=3, ref_seeds=2, tasks=("kv", "mod", "rev"))
QUICK = Scale(150, {"kv": 100}, seeds=1, ref_seeds=1, tasks=("kv",))


def lora_recipe(scale: Scale, task: str, seed: int) -> dict:
    """The one LoRA recipe, per task only in its step count."""
    return {"rank": 8, "alpha": 16, "steps": scale.lora_steps[task], "lr": 5e-3, "batch": 64, "seed": seed}


def build_bases(cache: Path, scale: Scale) -> dict[str, Path]:
    """Train or reuse every base; check that the grown ones compute what the source computes."""
    source_recipe = {"config": SOURCE_CONFIG, "seed": 1, "steps": scale.base_steps, "lr": 3e-3, "mix": MIX}
    source = train_base(cache, "source", source_recipe)
    further_recipe = {"from": source_recipe, "seed": 3, "steps": scale.base_steps // 2, "lr": 1e-3,
                      "mix": SHIFTED_MIX}  # fmt: skip
    same_recipe = {**further_recipe, "mix": MIX}
    short_recipe = {**same_recipe, "steps": scale.base_steps // 8}
    bases = {
        "source": source,
        "further-short": train_base(cache, "further-short", short_recipe, start=source),
        "further-same": train_base(cache, "further-same", same_recipe, start=source),
        "further": train_base(cache, "further", further_recipe, start=source),
        "independent": train_base(cache, "independent", {**source_recipe, "seed": 2}),
    }
    wider = wider_config(SOURCE_CONFIG, 2)
    deeper = {**SOURCE_CONFIG, "num_hidden_layers": 2 * SOURCE_CONFIG["num_hidden_layers"]}
    grown = {
        "deeper": (deeper, grow_deeper),
        "wider": (wider, lambda s: grow_wider(s, SOURCE_CONFIG, wider, 5)),
    }
    for name, (config, grow) in grown.items():
        recipe = {"grow": name, "from": source_recipe, "config": config}
        bases[name] = cached(cache, name, recipe, lambda tmp, c=config, g=grow: _grow(source, c, g, tmp))
    return bases


def _grow(source: Path, config: dict, grow, tmp: Path) -> dict:
    save_grown(grow(load(source).state_dict()), config, tmp)
    return {}


def growth_checks(bases: dict[str, Path]) -> dict[str, float]:
    """max |logits diff| of each grown base against the source on corpus-like inputs."""
    ids = torch.randint(3, VOCAB, (8, 48), generator=torch.Generator().manual_seed(0))
    source = load(bases["source"])
    return {name: max_logit_diff(source, load(bases[name]), ids) for name in ("deeper", "wider")}


def drift(bases: dict[str, Path]) -> dict[str, float]:
    """How far the trained targets are from the source: mean relative Frobenius distance of the
    layers' weight matrices."""
    source = load(bases["source"]).state_dict()
    result = {}
    for name in ("further-short", "further-same", "further", "independent"):
        other = load(bases[name]).state_dict()
        ratios = [
            float((other[k] - v).norm() / v.norm())
            for k, v in source.items()
            if v.ndim == 2 and "layers" in k
        ]
        result[name] = sum(ratios) / len(ratios)
    return result


def build_adapters(cache: Path, scale: Scale, bases: dict[str, Path]) -> dict:
    """{(base name, task, seed): PEFT dir}: `seeds` on the source, `ref_seeds` on every target."""
    adapters = {}
    for name, base in bases.items():
        for task in scale.tasks:
            for seed in range(scale.seeds if name == "source" else scale.ref_seeds):
                recipe = lora_recipe(scale, task, seed)
                label = f"lora-{name}-{task}-s{seed}"
                adapters[name, task, seed] = train_lora(cache, label, base, TASKS[task], recipe)
                print(f"  {label}: {_seconds(adapters[name, task, seed])}", flush=True)
    return adapters


def _seconds(directory: Path) -> str:
    recipe = json.loads((directory / "recipe.json").read_text())
    return f"trained in {recipe['info']['seconds']:.0f} s, loss {recipe['info']['losses'][-1]}"
