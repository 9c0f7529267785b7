"""The transfer study's models: trained bases and PEFT LoRA adapters, cached by their recipe.

A recipe is a plain dict (config, seed, steps, learning rate, data mix, and the recipe of the model
it starts from); its sha256 names the cache directory, so changing anything retrains just what
depends on it, and a rerun reuses everything else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _transfer_data import BOS, EOS, PAD, VOCAB, Corpus, Task

SOURCE_CONFIG = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=192, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=PAD)  # fmt: skip
MIX = {"copy": 1.0, "shift": 1.0, "count": 0.5, "sum": 1.0, "words": 1.0}
SHIFTED_MIX = {"copy": 0.5, "shift": 1.5, "count": 0.5, "sum": 1.5, "words": 0.5}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LENGTH = 32, 64


def recipe_key(recipe: dict) -> str:
    """A short, stable name for a recipe."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cached(cache: Path, name: str, recipe: dict, build: Callable[[Path], dict]) -> Path:
    """The directory `name-KEY` under cache, built by `build(tmp)` into a temporary sibling if missing."""
    final = cache / f"{name}-{recipe_key(recipe)}"
    if (final / "recipe.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{name}-", dir=cache))
    try:
        start = time.perf_counter()
        info = build(tmp)
        info["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "recipe.json").write_text(json.dumps({"recipe": recipe, "info": info}, indent=2) + "\n")
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def info(directory: Path) -> dict:
    """What building a cached directory reported (losses, accuracy, seconds)."""
    return json.loads((directory / "recipe.json").read_text())["info"]


def load(directory: Path):
    """A cached base model, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def fit(
    model,
    batches: Callable[[np.random.Generator], tuple],
    steps: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW with a one-cycle schedule on fresh batches; returns the loss at 10 points."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng, losses = np.random.default_rng(seed), []
    model.train()
    for step in range(steps):
        ids, labels = (torch.from_numpy(x) for x in batches(rng))
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            losses.append(round(loss.item(), 3))
    model.eval()
    return losses


def corpus_batches(mix: dict[str, float]) -> Callable[[np.random.Generator], tuple]:
    """Packed corpus batches with every token scored."""
    corpus = Corpus(mix)

    def draw(rng: np.random.Generator) -> tuple:
        ids = corpus.batch(rng, BATCH, LENGTH)
        return ids, ids

    return draw


def train_base(cache: Path, name: str, recipe: dict, start: Path | None = None) -> Path:
    """A base trained on the corpus from scratch (recipe["seed"]) or on from `start`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tmp: Path) -> dict:
        torch.manual_seed(recipe["seed"])
        model = LlamaForCausalLM(LlamaConfig(**recipe["config"])) if start is None else load(start)
        losses = fit(model, corpus_batches(recipe["mix"]), recipe["steps"], recipe["lr"], recipe["seed"])
        model.save_pretrained(tmp, safe_serialization=True)
        return {"losses": losses}

    return cached(cache, name, recipe, build)


def train_lora(cache: Path, name: str, base: Path, task: Task, recipe: dict) -> Path:
    """A PEFT LoRA trained on `task` over `base` (recipe: rank, alpha, steps, lr, batch, seed)."""
    from peft import LoraConfig, get_peft_model

    def build(tmp: Path) -> dict:
        torch.manual_seed(recipe["seed"])
        config = LoraConfig(r=recipe["rank"], lora_alpha=recipe["alpha"], lora_dropout=0.0,
                            target_modules=LORA_MODULES, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(load(base), config)
        losses = fit(model, lambda rng: task.batch(rng, recipe["batch"]), recipe["steps"], recipe["lr"],
                     recipe["seed"])  # fmt: skip
        model.save_pretrained(tmp)
        return {"losses": losses}

    return cached(cache, name, {**recipe, "task": task.name, "base": base.name}, build)


@torch.inference_mode()
def accuracy(model, task: Task, pairs: list[tuple[str, str]] | None = None) -> float:
    """Exact match of the greedy answer on the task's scored set, or on `pairs` (every answer token right)."""
    prompts, answers = task.scored(pairs)
    ids = torch.from_numpy(prompts)
    for _ in range(task.answer_len):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return float((ids[:, prompts.shape[1] :].numpy() == answers).all(axis=1).mean())
