"""One family of the coverage sweep: a tiny base, PEFT's all-linear LoRA as reference, each target checked.

`build_reference` saves the base and the adapter and computes PEFT's forward (fp32); a family PEFT cannot
adapt raises PeftTroubleError (get_peft_model or its forward raises, the saved adapter reloads to other
logits, merge_and_unload disagrees with the forward, or the adapter changes nothing). `check_target`
compiles with Adaptrix and compares; `sweep_family` does both and returns one row of the table.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from families import SKIPPED, auto_class, sample_inputs, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

__all__ = [
    "ONNX_TOLERANCE",
    "TARGETS",
    "TOLERANCE",
    "PeftTroubleError",
    "Reference",
    "build_reference",
    "check_target",
    "quiet",
    "sweep_family",
]

TOLERANCE = 1e-4  # max |diff| of logits against PEFT's forward, float32 (the bound)
ONNX_TOLERANCE = 5e-4  # onnxruntime's float32 kernels against PEFT (tests/test_onnx_parity.py's bound)
TARGETS = ("merged", "hooks", "onnx-cpu")
_EFFECT = 100 * TOLERANCE  # the adapter must move the logits by more than this, or a no-op would pass


class PeftTroubleError(Exception):
    """PEFT itself cannot adapt the family (its text says at which step)."""


@dataclass(frozen=True)
class Reference:
    """A saved tiny base and adapter, the fixed inputs and PEFT's logits on them."""

    model_type: str
    mapping: str
    base: Path
    adapter: Path
    inputs: dict
    logits: torch.Tensor


def quiet() -> None:
    """Silence transformers', PEFT's and Adaptrix's warnings (the sweep reports outcomes, not chatter)."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("adaptrix").setLevel(logging.ERROR)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:limit]


@torch.no_grad()
def logits_of(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits on `inputs`, float32."""
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected|, inf when the shapes differ."""
    return float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")


def load_base(ref_or_mapping: Reference | str, path: Path) -> torch.nn.Module:
    """A saved model loaded float32 in eval mode by the mapping's auto class."""
    mapping = ref_or_mapping.mapping if isinstance(ref_or_mapping, Reference) else ref_or_mapping
    return auto_class(mapping).from_pretrained(path, dtype=torch.float32).eval()


def _step(label: str, action, *args):
    """Run one PEFT step; any failure becomes PeftTroubleError naming the step."""
    try:
        return action(*args)
    except Exception as exc:
        raise PeftTroubleError(f"{label}: {first_line(exc)}") from exc


def build_reference(model_type: str, mapping: str, root: Path, seed: int = 0) -> Reference:
    """Save a tiny base and a seeded all-linear LoRA into `root`; PEFT's logits are the reference."""
    base, adapter = root / "base", root / "adapter"
    tiny_model(model_type, mapping, seed).save_pretrained(base, safe_serialization=True)
    inputs = sample_inputs(model_type, mapping)
    base_logits = logits_of(load_base(mapping, base), inputs)
    config = LoraConfig(target_modules="all-linear", init_lora_weights=False, r=4, lora_alpha=8)
    torch.manual_seed(seed + 1)  # PEFT draws the LoRA weights from the global generator
    model = _step("get_peft_model", get_peft_model, load_base(mapping, base), config).eval()
    expected = _step("forward", logits_of, model, inputs)
    model.save_pretrained(adapter, safe_serialization=True)
    reloaded = _step("reload", PeftModel.from_pretrained, load_base(mapping, base), adapter)
    if (diff := max_diff(logits_of(reloaded.eval(), inputs), expected)) > TOLERANCE:
        raise PeftTroubleError(f"reload: the saved adapter gives other logits (max diff {diff:.2e})")
    merged = _step("merge_and_unload", model.merge_and_unload)
    if (diff := max_diff(logits_of(merged, inputs), expected)) > TOLERANCE:
        raise PeftTroubleError(f"merge_and_unload differs from PEFT's forward (max diff {diff:.2e})")
    _check_ties(merged, load_base(mapping, base), adapter)
    if (effect := max_diff(base_logits, expected)) <= _EFFECT:
        raise PeftTroubleError(f"the adapter moves the logits by {effect:.1e} only: too little to test")
    return Reference(model_type, mapping, base, adapter, inputs, expected)


def _check_ties(merged: torch.nn.Module, base: torch.nn.Module, adapter: Path) -> None:
    """PEFT's merge must change only the modules it adapted: a LoRA on a module whose weight is tied to
    another's (LUKE's entity head, tied to the entity embeddings) changes both when merged, while PEFT's
    forward changes only the module: PEFT's own result depends on whether it merges (ill-defined).
    """
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        keys = [key.removeprefix("base_model.model.").split(".lora_")[0] for key in handle.keys()]  # noqa: SIM118
    adapted = {key.replace(".base_layer", "") for key in keys}  # nested ParamWrappers (packed experts)
    before = base.state_dict()
    for name, value in merged.state_dict().items():
        if name.rpartition(".")[0] in adapted or name not in before or torch.equal(value, before[name]):
            continue
        raise PeftTroubleError(
            f"merge_and_unload changes {name}, which PEFT's forward leaves alone (its weight is tied to an "
            "adapted module): merged and unmerged PEFT differ wherever it is used"
        )


def _target_logits(ref: Reference, target: str, out: Path) -> torch.Tensor:
    """Compile `ref`'s adapter to `target` at `out` and run it on `ref.inputs`."""
    import adaptrix

    adaptrix.compile_adapter(ref.adapter, base=ref.base, target=target, out=out)
    if target == "merged":
        return logits_of(load_base(ref, out), ref.inputs)
    if target == "hooks":
        model = load_base(ref, ref.base)
        adaptrix.attach(model, out)
        return logits_of(model, ref.inputs)
    return _onnx_logits(ref, out)


def _onnx_logits(ref: Reference, out: Path) -> torch.Tensor:
    """The logits of an onnx-cpu output: seq2seq through optimum's ORTModelForSeq2SeqLM, else one run of
    model.onnx with an empty cache (optimum's ORTModelForCausalLM sizes phi3's cache from the wrong heads).
    """
    ids = ref.inputs["input_ids"]
    if (out / "encoder_model.onnx").is_file():  # optimum's seq2seq graphs (bart's masked-LM class too)
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        model = ORTModelForSeq2SeqLM.from_pretrained(out)
        inputs = dict(ref.inputs, attention_mask=torch.ones_like(ids))
        if "decoder_input_ids" not in inputs:  # what BART's forward does without them: ids shifted right
            prepare = load_base(ref.mapping, ref.base).prepare_decoder_input_ids_from_labels
            inputs["decoder_input_ids"] = prepare(labels=ids)
        return logits_of(model, inputs)
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    batch, length = ids.shape
    given = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((batch, length), dtype=np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None].repeat(batch, 0),
        "token_type_ids": np.zeros((batch, length), dtype=np.int64),
    }
    feeds = {}
    for each in session.get_inputs():
        if each.name in given:
            feeds[each.name] = given[each.name]
        elif each.name.startswith("past_key_values"):  # an empty cache: batch as given, no past positions
            shape = [batch if "batch" in str(d) else (d if isinstance(d, int) else 0) for d in each.shape]
            feeds[each.name] = np.zeros(shape, dtype=np.float32)
        else:
            raise ValueError(f"model.onnx asks for input {each.name!r}, which the sweep cannot give")
    return torch.from_numpy(session.run(["logits"], feeds)[0]).float()


def check_target(ref: Reference, target: str, out: Path) -> tuple[str, float | None]:
    """("ok" | "mismatch" | "error: ...", max diff) of one target against PEFT's logits."""
    try:
        got = _target_logits(ref, target, out)
    except Exception as exc:
        return f"error: {first_line(exc)}", None
    diff = max_diff(got, ref.logits)
    bound = ONNX_TOLERANCE if target.startswith("onnx") else TOLERANCE
    return ("ok" if diff <= bound else "mismatch"), diff


def _relative(row: dict, root: Path) -> dict:
    """The row with the family's folder dropped from its texts (they name files inside it)."""
    prefix = f"{root}/"
    return {key: value.replace(prefix, "") if isinstance(value, str) else value for key, value in row.items()}


def sweep_family(
    model_type: str, mapping: str, root: Path, targets=("merged", "hooks"), seed: int = 0, report=None
) -> dict:
    """One row of the sweep: {family, mapping, build, peft, <target>: outcome, <target>_diff}.

    `report(row)` is called with the row so far after each step (a caller that must kill a hung
    family then knows which step hung).
    """
    row = {"family": model_type, "mapping": mapping, "build": "ok", "peft": "ok"}
    if model_type in SKIPPED:
        return {**row, "build": f"skip: {SKIPPED[model_type]}", "peft": "-"}
    try:
        ref = build_reference(model_type, mapping, root, seed)
    except PeftTroubleError as exc:
        return _relative({**row, "peft": f"fail: {exc}"}, root)
    except ImportError as exc:
        return {**row, "build": f"skip: needs an external package ({first_line(exc)})", "peft": "-"}
    except Exception as exc:
        return _relative({**row, "build": f"error: {first_line(exc)}", "peft": "-"}, root)
    for target in targets:
        if report:
            report(row)
        row[target], row[f"{target}_diff"] = check_target(ref, target, root / target)
        row = _relative(row, root)
    return row
