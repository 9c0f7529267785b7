"""Benchmark: a QLoRA adapter merged five ways, against PEFT on the 4-bit base it was trained on.

Run: flock /tmp/adaptrix-heavy.lock python benchmarks/qlora.py [--cache DIR] [--base-steps N]

The base is the transfer study's source model (benchmarks/_transfer_models.py: Llama, 4 layers,
hidden 64, trained on CPU on its character corpus; --quick's 150 steps by default), stored in
bfloat16 (the "original bf16 base"), then quantized by transformers with bitsandbytes to NF4 with
double quantization (compute dtype float32) and saved. A small LoRA (r=4 on all seven projections)
is trained with QLoRA against the 4-bit model (prepare_model_for_kbit_training, then PEFT) on the
study's kv task (a table of 64 three-letter keys to values: recall, where small weight errors
flip answers). Everything is cached by its recipe. Each way of shipping the adapter is scored on
the task's 64 prompts: exact-match accuracy of the greedy answer, and on the answers
teacher-forced (float32 logits) top-1 agreement with (a) and max |logits - (a)|:

(a) PEFT's adapter on the 4-bit model, training mode (dropout 0): the function trained on (on CPU
    bitsandbytes runs the same gemm_4bit with and without autograd, dequantizing into float32);
(a') the same in eval mode (bitsandbytes' CPU inference kernel);
(b) the adapter merged into the original bf16 base (PEFT merge_and_unload: the common recipe);
(c) PEFT's merge_and_unload on the 4-bit model (re-quantized), and adaptrix --requantize;
(d) adaptrix --merge-into dequantized from the 4-bit base;
(e) adaptrix --qlora-base from the bf16 base.
(b), (d), (e) are written in bfloat16 (what ships) and in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# Keep this folder off the front of sys.path: its onnx.py would shadow the onnx package adaptrix imports.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
import _measure as m  # noqa: E402
import _transfer_models as tm  # noqa: E402
from _transfer_data import TASKS  # noqa: E402
from _transfer_plan import QUICK  # noqa: E402

CACHE_NAME, TASK = "transfer-v1", TASKS["kv"]  # the transfer study's cache: its source base is shared
LORA = {"rank": 4, "alpha": 8, "steps": 150, "lr": 5e-3, "batch": 64, "seed": 2718}
SCHEME = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype="float32")  # fmt: skip


def source_base(cache: Path, steps: int) -> Path:
    """The transfer study's source base (its recipe; `steps`: QUICK's 150 or FULL's 1200)."""
    recipe = {"config": tm.SOURCE_CONFIG, "seed": 1, "steps": steps, "lr": 3e-3, "mix": tm.MIX}
    return tm.train_base(cache, "source", recipe)


def qlora_fixture(cache: Path, source: Path) -> Path:
    """The bf16 base, its NF4 save and the QLoRA adapter, cached by recipe."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    def build(dest: Path) -> dict:
        tf.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(dest / "bf16")
        config = tf.BitsAndBytesConfig(**SCHEME)
        quantized = tf.AutoModelForCausalLM.from_pretrained(dest / "bf16", quantization_config=config,
                                                            dtype=torch.bfloat16)  # fmt: skip
        quantized.save_pretrained(dest / "nf4")
        saved = json.loads((dest / "nf4" / "config.json").read_text())["quantization_config"]
        (dest / "qlora.json").write_text(json.dumps(saved, indent=2) + "\n")
        model = prepare_model_for_kbit_training(
            tf.AutoModelForCausalLM.from_pretrained(dest / "nf4", dtype=torch.float32)
        )
        lora = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                          target_modules=tm.LORA_MODULES, task_type="CAUSAL_LM")  # fmt: skip
        torch.manual_seed(LORA["seed"])
        peft_model = get_peft_model(model, lora)
        losses = tm.fit(peft_model, lambda rng: TASK.batch(rng, LORA["batch"]), LORA["steps"], LORA["lr"],
                        LORA["seed"])  # fmt: skip
        peft_model.save_pretrained(dest / "adapter")
        return {"losses": losses}

    recipe = {**LORA, "task": TASK.name, "base": source.name, "scheme": SCHEME}
    return tm.cached(cache, "qlora", recipe, build)


def _forced():
    """The task's prompts followed by their answers (teacher-forced); where the answer logits start."""
    import numpy as np

    prompts, answers = TASK.scored()
    return np.concatenate([prompts, answers[:, :-1]], axis=1), prompts.shape[1] - 1


def _score(model, train: bool) -> tuple:
    """Exact-match accuracy and the teacher-forced answer logits (float32)."""
    import torch

    forced, first = _forced()
    accuracy = tm.accuracy(model.train(train), TASK)
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(forced)).logits[:, first:].float()
    return accuracy, logits


def _load(path: Path):
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _peft(base: Path, adapter: Path, dtype: str = "float32"):
    import torch
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(model, adapter)


def ways(fixture: Path, work: Path) -> dict:
    """name -> (accuracy, answer logits) of each way of shipping the adapter."""
    from adaptrix.api.compile import compile_adapter

    bf16, nf4, adapter, config = (fixture / n for n in ("bf16", "nf4", "adapter", "qlora.json"))
    out = {"(a) PEFT on the 4-bit base": _score(_peft(nf4, adapter), train=True),
           "(a') the same, eval mode": _score(_peft(nf4, adapter), train=False)}  # fmt: skip
    for dtype in ("bfloat16", "float32"):
        _peft(bf16, adapter, dtype).merge_and_unload().save_pretrained(work / f"b-{dtype}")
        out[f"(b) merged into the bf16 base, {dtype}"] = _score(_load(work / f"b-{dtype}"), train=False)
    requantized = _peft(nf4, adapter).merge_and_unload()
    out["(c) PEFT merge_and_unload on the 4-bit model"] = _score(requantized, train=True)
    compile_adapter(adapter, nf4, "merged", work / "c-adaptrix", requantize=True)
    out["(c) adaptrix --requantize"] = _score(_load(work / "c-adaptrix"), train=True)
    for dtype in ("bfloat16", "float32"):
        compile_adapter(adapter, nf4, "merged", work / f"d-{dtype}", dtype=dtype, merge_into="dequantized")
        out[f"(d) adaptrix --merge-into dequantized, {dtype}"] = _score(_load(work / f"d-{dtype}"), False)
        compile_adapter(adapter, bf16, "merged", work / f"e-{dtype}", dtype=dtype, qlora_base=config)
        out[f"(e) adaptrix --qlora-base, {dtype}"] = _score(_load(work / f"e-{dtype}"), train=False)
    out["4-bit base without the adapter"] = _score(_load(nf4), train=True)
    return out


def report(scores: dict) -> None:
    """Print accuracy, top-1 agreement and max |diff| against (a), one row per way."""
    ref = scores["(a) PEFT on the 4-bit base"][1]
    rows = []
    for name, (accuracy, logits) in scores.items():
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append([name, f"{accuracy:.1%}", f"{agree:.2%}", f"{(logits - ref).abs().max().item():.1e}"])
    print(f"task {TASK.name}: {ref.shape[0]} prompts, exact match of the greedy answer; "
          f"{ref.shape[:2].numel()} answer tokens teacher-forced for top-1 and logits")  # fmt: skip
    print(m.format_table(["way", "accuracy", "top-1 = (a)", "max |logits - (a)|"], rows))


def main(argv=None) -> None:
    """Train or reuse the base and the QLoRA adapter, compile every way, print the table."""
    ap = argparse.ArgumentParser(description="A QLoRA adapter merged five ways, against PEFT.")
    ap.add_argument("--cache", type=Path, default=m.default_cache(), help="fixture cache dir")
    ap.add_argument("--base-steps", type=int, default=QUICK.base_steps, help="the source base's steps")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    cache = args.cache.expanduser().resolve() / CACHE_NAME
    source = source_base(cache, args.base_steps)
    fixture = qlora_fixture(cache, source)
    print(f"base {source} ({tm.info(source)['seconds']} s), QLoRA fixture {fixture} "
          f"({tm.info(fixture)['seconds']} s, losses {tm.info(fixture)['losses']})")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="qlora-") as work:
        report(ways(fixture, Path(work)))


if __name__ == "__main__":
    main()
