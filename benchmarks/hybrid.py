"""Benchmark: a hybrid adapter (LoRA r=8 on q, k, v, o + a SeqBn bottleneck of 64 after every FFN).

Run: python benchmarks/hybrid.py [--rounds N] [--prefill-rounds N] [--steps N] [--skip-onnx]
On merge.py's cached 1.1B Llama base (float32 on CPU): the bare base, AdapterHub's own model with
the adapter active, the adapter compiled to a hooks bundle and attached to the bare base, and the
adapter compiled to onnx-cpu (bottlenecks as graph nodes) run by onnxruntime with 2 threads. The
adapter is made with AdapterHub itself (ConfigUnion of LoRAConfig on the attention's q, k, v and o
and SeqBnConfig with reduction factor hidden / 64), its weights perturbed so nothing is zero.
Latencies of one decode step on a 32-token KV cache and of a 32-token prefill are interleaved round
by round; the goal is a ratio within this run: the bundle's overhead over the bare base at most
half of AdapterHub's.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as m
import hooks as h
import merge

# benchmarks/onnx.py would shadow the onnx package that the onnx-cpu target imports
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

BOTTLENECK = 64
RANK = 8
VARIANTS = ("base", "bundle", "adapterhub")


class _OrtCache:
    """The past of an onnxruntime decoder, shaped like what bench_decode does with a HF cache."""

    def __init__(self, past: dict):
        self.past = past

    def crop(self, length: int) -> None:
        """Nothing to do: a step returns a new past and leaves this one at its length."""


class OrtModel:
    """An onnx-cpu decoder called like a transformers model by hooks.bench_decode / bench_prefill."""

    def __init__(self, path: Path):
        self.decoder = m.OrtDecoder(path, threads=2)

    def __call__(self, input_ids, past_key_values=None, use_cache=False):
        import types

        import torch

        past = past_key_values.past if past_key_values is not None else None
        logits, present = self.decoder.forward(input_ids.numpy(), past)
        return types.SimpleNamespace(logits=torch.from_numpy(logits), past_key_values=_OrtCache(present))


def make_hub_adapter(base: Path, dest: Path) -> Path:
    """LoRA r=8 (q, k, v, o) + SeqBn 64 after the FFN, built and saved with AdapterHub."""
    import adapters
    import torch
    from adapters import ConfigUnion, LoRAConfig, SeqBnConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapters.init(model)
    hidden = model.config.hidden_size
    config = ConfigUnion(LoRAConfig(r=RANK, alpha=16, attn_matrices=["q", "k", "v", "o"]),
                         SeqBnConfig(reduction_factor=hidden // BOTTLENECK))  # fmt: skip
    model.add_adapter("hybrid", config=config)
    generator = torch.Generator().manual_seed(merge.SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".hybrid." in name:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_adapter(str(dest), "hybrid")
    return dest


def load_hub_model(base: Path, adapter: Path):
    """A second fp32 copy of the base with the AdapterHub adapter loaded and active."""
    import adapters
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    adapters.init(model)
    model.set_active_adapters(model.load_adapter(str(adapter)))
    return model.eval()


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    ap = argparse.ArgumentParser(description="Time a hybrid adapter: bare base, AdapterHub, hooks bundle.")
    ap.add_argument("--rounds", type=int, default=12, help="decode rounds (default 12)")
    ap.add_argument("--steps", type=int, default=3, help="decode steps per variant per round (default 3)")
    ap.add_argument("--prefill-rounds", type=int, default=5, help="prefill rounds (default 5)")
    ap.add_argument("--cache", type=Path, default=m.default_cache(), help="fixture cache dir")
    ap.add_argument("--skip-onnx", action="store_true", help="do not compile and time onnx-cpu")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Build the adapter, compile it, check it, time the variants, print the goal."""
    args = parse_args(argv)
    import torch

    import adaptrix

    fixture = merge.ensure_fixture(args.cache.expanduser().resolve())
    base = fixture / "base"
    run_root = Path(tempfile.mkdtemp(prefix="hybrid-", dir=fixture.parent))
    try:
        adapter = make_hub_adapter(base, run_root / "adapter")
        t0 = time.perf_counter()
        adaptrix.compile_adapter(adapter, base, "hooks", run_root / "bundle")
        print(f"compile hooks: {time.perf_counter() - t0:.1f} s, {m.dir_size_mb(run_root / 'bundle'):.1f} MB")
        from transformers import AutoModelForCausalLM

        variants, onnx = VARIANTS, None
        if not args.skip_onnx:
            t0 = time.perf_counter()
            adaptrix.compile_adapter(adapter, base, "onnx-cpu", run_root / "onnx")
            print(f"compile onnx-cpu: {time.perf_counter() - t0:.1f} s")
            onnx, variants = OrtModel(run_root / "onnx" / "model.onnx"), (*VARIANTS, "onnx-cpu")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        hub = load_hub_model(base, adapter)
        bundle = adaptrix.load_bundle(run_root / "bundle")

        @contextlib.contextmanager
        def ctx(name: str):
            if name == "adapterhub":
                yield hub
            elif name == "onnx-cpu":
                yield onnx
            elif name == "bundle":
                with adaptrix.attach(model, bundle):
                    yield model
            else:
                yield model

        ids = torch.randint(0, merge.BASE_CONFIG["vocab_size"], (1, h.PROMPT),
                            generator=torch.Generator().manual_seed(merge.SEED))  # fmt: skip
        with torch.inference_mode():
            expected = hub(input_ids=ids, use_cache=False).logits
            with ctx("bundle") as attached:
                got = attached(input_ids=ids, use_cache=False).logits
            bare = model(input_ids=ids, use_cache=False).logits
        diff, effect = float((got - expected).abs().max()), float((expected - bare).abs().max())
        if onnx is not None:
            onnx_diff = float((onnx(ids).logits - expected).abs().max())
            print(f"check: prefill logits max |onnx-cpu - AdapterHub| = {onnx_diff:.3e}")
        decode = h.bench_decode(ctx, ids, max(1, args.rounds), max(1, args.steps), variants)
        prefill = h.bench_prefill(ctx, ids, max(1, args.prefill_rounds), variants)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    dec = h.latency_table(f"decode step, {h.PROMPT}-token KV cache", decode)
    pre = h.latency_table(f"prefill, {h.PROMPT} tokens", prefill)
    ok_logits = diff <= h.LOGITS_ATOL and effect > 100 * diff
    print(f"\ncheck: prefill logits max |bundle - AdapterHub| = {diff:.3e} (tolerance {h.LOGITS_ATOL:.0e}); "
          f"the adapter moves them by {effect:.3e}: {'ok' if ok_logits else 'FAILED'}")  # fmt: skip
    met = True
    for label, table in (("decode", dec), ("prefill", pre)):
        ours, theirs = table["bundle"]["paired"], table["adapterhub"]["paired"]
        ok = ours <= theirs / 2
        met &= ok
        ratio = ours / theirs if theirs else float("nan")
        print(f"goal: {label} overhead of the bundle {ours:+.1%} <= half of AdapterHub's {theirs:+.1%} "
              f"(ratio {ratio:.2f}): {'met' if ok else 'NOT met'}")  # fmt: skip
    print(f"medians: {statistics.median(decode['base']) * 1e3:.1f} ms per bare decode step")
    return 0 if ok_logits else 1


if __name__ == "__main__":
    sys.exit(main())
