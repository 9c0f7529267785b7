"""onnxruntime-genai's model builder beside Adaptrix's graphs (benchmarks/onnx.py): built, timed in one run.

The builder needs transformers 5; the project's environment may hold 4.57. A python that can
import it is found in this order: --builder-python, $ADAPTRIX_BUILDER_PYTHON, this interpreter,
else a venv made once under the benchmark cache (transformers>=5, onnxruntime-genai, torch CPU).
Both graphs run under onnxruntime-genai with the same harness: a 32-token prompt, greedy, 2 intra-op
threads, rounds of 16 new tokens, the graphs interleaved (order rotating, round 0 a warm-up).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _measure as m

PYTHON_ENV = "ADAPTRIX_BUILDER_PYTHON"
VENV = "builder-venv"
VENV_PACKAGES = ["transformers>=5", "onnxruntime-genai", "onnx-ir", "torch", "safetensors", "numpy"]
CHECK = "import onnxruntime_genai.models.builder"


def builder_python(cache: Path, given: str | None) -> str:
    """A python that imports onnxruntime_genai.models.builder (made under `cache` if none is found)."""
    for candidate in (given, os.environ.get(PYTHON_ENV), sys.executable):
        if candidate and _imports_builder(candidate):
            return candidate
        if candidate and candidate in (given, os.environ.get(PYTHON_ENV)):
            sys.exit(f"{candidate} cannot import onnxruntime_genai.models.builder")
    venv = cache / VENV
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"builder: making {venv} (transformers>=5 + onnxruntime-genai; one time)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--extra-index-url",
                        "https://download.pytorch.org/whl/cpu", *VENV_PACKAGES], check=True)  # fmt: skip
    if not _imports_builder(str(python)):
        sys.exit(f"{python} cannot import onnxruntime_genai.models.builder")
    return str(python)


def _imports_builder(python: str) -> bool:
    done = subprocess.run([python, "-c", CHECK], capture_output=True, check=False)
    return done.returncode == 0


def with_tokenizer(base: Path, dest: Path) -> Path:
    """`base`, or where it has no tokenizer.json (the fixtures), links to its files and a stand-in tokenizer.

    The builder loads the base's tokenizer (to write its processing files); the graph does not use it.
    """
    if (base / "tokenizer.json").is_file():
        return base
    from tokenizers import Tokenizer, models

    dest.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():
        if not file.name.startswith("tokenizer") and not (dest / file.name).exists():
            (dest / file.name).symlink_to(file.resolve())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>"}  # fmt: skip
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def build(python: str, base: Path, out: Path, precision: str, log: Path) -> m.Sample | None:
    """Run the builder (`-p precision -e cpu`) in a measured child; None if it failed."""
    base = with_tokenizer(base, out.parent / f"{base.name}-with-tokenizer")
    argv = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
            "-p", precision,
            "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]  # fmt: skip
    s = m.run_measured(argv, log)
    print(f"  builder {precision:<5} wall {s.wall_s:7.2f} s  peak RSS {s.peak_rss_mb:8.0f} MB  "
          f"rc {s.returncode}",
          flush=True)  # fmt: skip
    if s.returncode != 0 or not (out / "genai_config.json").is_file():
        print(f"  builder {precision} failed, log tail:\n{m.log_tail(log)}")
        return None
    return s


def node_count(folder: Path) -> int:
    """Nodes of the folder's decoder graph (the file genai_config.json names)."""
    import onnx

    name = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return len(onnx.load(folder / name, load_external_data=False).graph.node)


def set_threads(folder: Path, threads: int) -> None:
    """Pin onnxruntime-genai's session of `folder` to `threads` intra-op threads (one inter-op)."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    path.write_text(json.dumps(config, indent=2))


def genai_times(folders: dict[str, Path], prompt, new_tokens: int, rounds: int, threads: int) -> dict:
    """{name: {"decode": [s/token per round], "prefill": [s per round], "tokens": first round's tokens}}.

    Prefill: append_tokens of the prompt and the pick of the first token; decode: the mean of the
    other new tokens' steps (each one run of the graph on a cache of 32 and more).
    """
    import numpy as np
    import onnxruntime_genai as og

    models = {}
    for name, folder in folders.items():
        set_threads(folder, threads)
        models[name] = og.Model(str(folder))
    names, found = list(models), {name: {"decode": [], "prefill": [], "tokens": None} for name in models}
    ids = np.asarray([prompt], dtype=np.int32)
    for r in range(rounds + 1):  # round 0 warms up, untimed
        for name in names[r % len(names) :] + names[: r % len(names)]:
            params = og.GeneratorParams(models[name])
            params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
            generator = og.Generator(models[name], params)
            t0 = time.perf_counter()
            generator.append_tokens(ids)
            t1 = time.perf_counter()
            tokens, steps = [], []
            for _ in range(new_tokens):
                t = time.perf_counter()
                generator.generate_next_token()  # the first picks from the prefill's logits: no run
                tokens.append(int(generator.get_next_tokens()[0]))
                steps.append(time.perf_counter() - t)
            if r:
                found[name]["prefill"].append(t1 - t0 + steps[0])
                found[name]["decode"].append(statistics.mean(steps[1:]))
            found[name]["tokens"] = found[name]["tokens"] or tokens
    return found


def median_ms(values: list[float]) -> float:
    """The median of seconds, in ms."""
    return statistics.median(values) * 1e3


GOAL_RATIO, STRETCH_RATIO = 1.00, 0.90  # Adaptrix decode ms/token over the builder's, same run


# Adaptrix's scheme -> the builder's precision it is timed against. The builder's int4 is symmetric
# blocks without zero points: int4-sym is the like-for-like scheme (the same MatMulNBits kernel) and
# carries the goal; Adaptrix's int4 (a zero point per block: closer to float32, a slower kernel)
# is reported beside it.
BUILDER_PRECISION = {"int4-sym": "int4", "int4": "int4", "int8": "int8"}
GOAL_SCHEMES = ("int4-sym", "int8")


def versus(python: str, base: Path, adaptrix: dict[str, Path], root: Path, prompt, new_tokens: int,
           rounds: int, threads: int) -> list[bool]:  # fmt: skip
    """The builder's graph of `base` per scheme of `adaptrix`, all timed under genai; the verdicts."""
    folders, against = {}, {}
    for scheme, folder in adaptrix.items():
        precision = BUILDER_PRECISION[scheme]
        built = root / f"builder-{precision}"
        if (built / "genai_config.json").is_file():
            print(f"  builder {precision}: built earlier in this run ({built})")
        elif build(python, base, built, precision, root / f"builder-{precision}.log") is None:
            if scheme in GOAL_SCHEMES:
                return [False]
            print(f"  builder {precision}: not written, so no {scheme} comparison")
            continue
        folders[f"adaptrix {scheme}"], folders[f"builder {precision}"] = folder, built
        against[scheme] = f"builder {precision}"
    times = genai_times(folders, prompt, new_tokens, rounds, threads)
    rows, verdicts = [], []
    for name, folder in folders.items():
        t = times[name]
        rows.append([name, f"{median_ms(t['decode']):.1f}", f"{median_ms(t['prefill']):.0f}",
                     str(node_count(folder))])  # fmt: skip
    print(f"\nonnxruntime-genai, {len(prompt)}-token prompt, greedy, {threads} threads, {rounds} interleaved "
          f"rounds of {new_tokens} tokens (medians)")  # fmt: skip
    print(m.format_table(["graph", "decode ms/token", f"prefill({len(prompt)}) ms", "nodes"], rows))
    for scheme, theirs_name in against.items():
        ours, theirs = times[f"adaptrix {scheme}"], times[theirs_name]
        ratio = median_ms(ours["decode"]) / median_ms(theirs["decode"])
        paired = statistics.median(a / b for a, b in zip(ours["decode"], theirs["decode"], strict=True))
        prefill = median_ms(ours["prefill"]) / median_ms(theirs["prefill"])
        goal = scheme in GOAL_SCHEMES
        ok = [ratio <= GOAL_RATIO, prefill <= 1.0]
        verdicts += ok if goal else []
        label = [("PASS" if x else "FAIL") if goal else "INFO" for x in ok]
        stretch = "met" if ratio <= STRETCH_RATIO else "missed"
        print(f"{label[0]}: {scheme} decode Adaptrix/{theirs_name} {ratio:.3f} (paired rounds {paired:.3f}); "
              f"goal <= {GOAL_RATIO:.2f}, stretch {STRETCH_RATIO:.2f} {stretch}"
              + ("" if goal else " (a different scheme: reported, not judged)"))  # fmt: skip
        print(f"{label[1]}: {scheme} prefill Adaptrix/{theirs_name} {prefill:.3f}; goal <= 1.00")
        same = ours["tokens"] == theirs["tokens"]
        print(
            f"INFO: {scheme} greedy tokens {'equal' if same else 'differ'} (random weights: near-flat logits)"
        )
    return verdicts
