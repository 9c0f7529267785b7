"""Build a tiny Llama base and a PEFT LoRA adapter locally, compile it, and prove it equals PEFT.

Compiles three times: a merged model, a hooks bundle attached to the plain base with
adaptrix.attach, and an onnx-cpu model run with onnxruntime (adaptrix.open_onnx, `adaptrix run`).

The ONNX exporter is optimum where it is installed (`pip install "adaptrix[onnx]"`, transformers
< 4.58), else onnxruntime-genai's model builder (transformers 5) or torch.onnx; the manifest says
which. Runs offline in under a minute:
`python examples/quickstart.py [OUT_DIR]` (default examples/out).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TOLERANCE = 1e-4  # max |diff| of float32 logits; onnxruntime agrees within it here too


def build(root: Path) -> tuple[Path, Path]:
    """A seeded 2-layer Llama (GQA) and a DoRA + rsLoRA adapter on all seven projections."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
    base, adapter = root / "base", root / "adapter"
    LlamaForCausalLM(config).save_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=True, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    get_peft_model(model, lora).save_pretrained(adapter)
    return base, adapter


def main() -> int:
    """Build, compile with the CLI (merged and hooks), inspect, compare logits with PEFT."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "out")
    base, adapter = build(root)
    merged, bundle, onnx_out = root / "merged", root / "bundle", root / "onnx-cpu"
    cli = [sys.executable, "-m", "adaptrix"]
    subprocess.run([*cli, "inspect", str(adapter), "--base", str(base)], check=True)
    targets = [("merged", merged), ("hooks", bundle), ("onnx-cpu", onnx_out)]
    for target, out in targets:
        subprocess.run([*cli, "compile", str(adapter), "--base", str(base), "--target", target,
                        "-o", str(out), "--force", "--cache-dir", str(root / "onnx-cache")]
                       [: None if target.startswith("onnx") else -2], check=True)  # fmt: skip
    prompt = [5, 17, 33, 9]
    subprocess.run([*cli, "run", str(onnx_out), "--prompt-ids", ",".join(map(str, prompt)),
                    "--max-new-tokens", "8"], check=True)  # fmt: skip
    import adaptrix

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
        expected = reference.eval()(ids).logits
        results = {"merged": LlamaForCausalLM.from_pretrained(merged).eval()(ids).logits}
        model = LlamaForCausalLM.from_pretrained(base).eval()
        with adaptrix.attach(model, bundle):  # detached again on exit
            results["hooks"] = model(ids).logits
        results["onnx-cpu"] = torch.from_numpy(adaptrix.open_onnx(onnx_out).logits(ids.numpy()))
        greedy = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    ok = True
    for target, got in results.items():
        diff = (got - expected).abs().max().item()
        ok &= diff <= TOLERANCE
        verdict = "OK" if diff <= TOLERANCE else "MISMATCH"
        print(f"{target} vs PEFT forward: max |diff| = {diff:.2e} (tolerance {TOLERANCE:g}): {verdict}")
    tokens = adaptrix.open_onnx(onnx_out).generate(prompt, 8)
    same = tokens == greedy[0, len(prompt) :].tolist()
    ok &= same
    print(f"onnx-cpu greedy tokens {tokens}: {'same as' if same else 'DIFFERENT from'} PEFT's generate")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
