"""The routing study's models: one small trained decoder and four domain LoRAs, cached by recipe.

Training reuses the transfer study's machinery (_transfer_models: cached, fit, train_lora, load);
only the base's corpus and vocabulary are the routing study's own (_routing_data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _routing_data import BOS, DOMAINS, EOS, PAD, TASKS, VOCAB, Corpus
from _transfer_models import SOURCE_CONFIG, cached, fit, load, train_lora

CONFIG = {**SOURCE_CONFIG, "vocab_size": VOCAB, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
BASE_RECIPE = {"config": CONFIG, "seed": 1, "steps": 4000, "lr": 3e-3, "corpus": "routing-v2", "length": 48}
LORA_STEPS = {"lower": 800, "digits": 800, "upper": 800, "symbols": 800}
BATCH = 32


def lora_recipe(task: str) -> dict:
    """One LoRA recipe for every domain (rank 8 on all seven projections), per task only in its steps."""
    return {"rank": 8, "alpha": 16, "steps": LORA_STEPS[task], "lr": 5e-3, "batch": 64, "seed": 1}


def train_base(cache: Path) -> Path:
    """The routing study's base: a small Llama trained from scratch on the four-alphabet corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def draw(rng: np.random.Generator) -> tuple:
        ids = Corpus().batch(rng, BATCH, BASE_RECIPE["length"])
        return ids, ids

    def build(tmp: Path) -> dict:
        torch.manual_seed(BASE_RECIPE["seed"])
        model = LlamaForCausalLM(LlamaConfig(**BASE_RECIPE["config"]))
        losses = fit(model, draw, BASE_RECIPE["steps"], BASE_RECIPE["lr"], BASE_RECIPE["seed"])
        model.save_pretrained(tmp, safe_serialization=True)
        return {"losses": losses}

    return cached(cache, "base", BASE_RECIPE, build)


def build(cache: Path) -> tuple[Path, dict[str, Path]]:
    """Train or reuse the base and one LoRA per domain."""
    base = train_base(cache)
    adapters = {d: train_lora(cache, f"lora-{d}", base, TASKS[d], lora_recipe(d)) for d in DOMAINS}
    return base, adapters


@torch.inference_mode()
def correct(model, task, prompts: np.ndarray | None = None) -> np.ndarray:
    """Per scored prompt of `task` (or of the given rows of its scored set): is the greedy answer exact."""
    all_prompts, answers = task.scored()
    rows = np.arange(len(all_prompts)) if prompts is None else prompts
    if len(rows) == 0:
        return np.zeros(0, dtype=bool)
    ids = torch.from_numpy(all_prompts[rows])
    for _ in range(task.answer_len):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return (ids[:, all_prompts.shape[1] :].numpy() == answers[rows]).all(axis=1)


__all__ = ["BASE_RECIPE", "build", "correct", "load", "lora_recipe"]
