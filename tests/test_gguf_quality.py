"""q8_0 GGUF quality: llama.cpp's greedy top-1 on a small trained decoder + LoRA agrees with PEFT's forward.

Random weights give near-flat logits, where any rounding flips the top-1 and agreement says nothing.
So a tiny Llama is trained here (seeded, seconds) on arithmetic progressions modulo NUMBERS: each
sequence is <s> <header> start, start + d, ... with the step d named by the header. The base learns
d = +1..+3; the LoRA learns d = -1..-3 too, a task the base cannot do. The adapter is compiled to a
q8_0 GGUF, run by llama.cpp (llama-cpp-python, through adaptrix's GGUF runtime), and scored
teacher-forced on held-out sequences of every task at every position after the start token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf target needs the gguf package")
pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the GGUF file")

from builders import VOCAB
from gguf_builders import save_tokenizer

SEED = 2028
NUMBERS, FIRST, LENGTH, BATCH = 48, 16, 20, 32  # token FIRST + k is the number k (mod NUMBERS)
UP = {3: 1, 4: 2, 5: 3}  # header token -> step: the base's tasks
DOWN = {6: -1, 7: -2, 8: -3}  # the adapter's new tasks
CONFIG = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL = 0.99


def _batch(rng: np.random.Generator, tasks: dict, size: int) -> torch.Tensor:
    """[size, LENGTH] sequences <s> <header> progression, the header and the start drawn uniformly."""
    headers = rng.choice(list(tasks), size)
    steps = np.array([tasks[h] for h in headers])[:, None]
    body = (rng.integers(0, NUMBERS, size)[:, None] + steps * np.arange(LENGTH - 2)) % NUMBERS + FIRST
    return torch.from_numpy(np.concatenate([np.ones((size, 1), np.int64), headers[:, None], body], axis=1))


def _train(model, tasks: dict, steps: int, seed: int) -> None:
    """AdamW with a one-cycle schedule on fresh batches of the tasks."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = _batch(rng, tasks, BATCH)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(base dir with a tokenizer, LoRA dir): the base trained on UP, the LoRA on UP and DOWN."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf-quality")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    _train(model, UP, 150, SEED)
    model.save_pretrained(root / "base")
    save_tokenizer(root / "base", VOCAB)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    _train(peft_model, {**UP, **DOWN}, 150, SEED + 1)
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_q8_0_gguf_top1_agrees_with_peft(trained, tmp_path):
    """q8_0 model.gguf in llama.cpp: top-1 agreement with PEFT's forward >= 99% on held-out positions."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from adaptrix.api.compile import compile_adapter
    from adaptrix.runtimes.gguf import open_gguf

    base, adapter = trained
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="q8_0")
    rows = _batch(np.random.default_rng(SEED + 2), {**UP, **DOWN}, 24)
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        reference = peft(input_ids=rows).logits.argmax(-1)
        with peft.disable_adapter():
            base_only = peft(input_ids=rows).logits.argmax(-1)
    scored = slice(2, LENGTH - 1)  # predictions of the second number on: fixed by the header and the start
    down = torch.tensor([int(h) in DOWN for h in rows[:, 1]])
    # The check can fail: without the adapter, the DOWN rows' predictions differ from PEFT's.
    assert (base_only[down, scored] == reference[down, scored]).float().mean() < 0.5
    assert (reference[:, scored] == rows[:, 3:]).float().mean() > 0.9  # trained: clear top-1s
    ours = torch.from_numpy(open_gguf(tmp_path / "out").logits(rows.tolist()).argmax(-1))  # llama.cpp's
    agreement = (ours[:, scored] == reference[:, scored]).float().mean().item()
    assert agreement >= GOAL, f"q8_0 GGUF top-1 agreement with PEFT {agreement:.3f} < {GOAL}"
