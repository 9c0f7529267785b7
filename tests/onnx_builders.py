"""Builders for ONNX adapter tests: unmerged artifacts, `.onnx_adapter` files, checks against PEFT."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from builders import load_model, make_adapter, needs_onnx_export, peft_logits, sample_inputs
from peft import PeftModel
from test_onnx_parity import (
    ONNX_FP32_TOLERANCE,
    activate,
    assert_matches,
    base_logits,
    max_diff,
    positions_of,
    prefill,
    session,
    step,
)

from adaptrix.api.compile import compile_adapter

__all__ = [
    "Unmerged",
    "assert_decode_step_matches_peft",
    "assert_each_file_matches_peft",
    "compile_unmerged",
    "two_adapter_unmerged",
    "write_onnx_adapter",
]


@dataclass(frozen=True)
class Unmerged:
    """A base, its adapters by name and one unmerged output holding them all."""

    family: str
    base: Path
    adapters: dict[str, Path]
    out: Path

    def adapter_file(self, name: str) -> Path:
        """The `.onnx_adapter` file of adapter `name`."""
        return self.out / "adapters" / f"{name}.onnx_adapter"

    @property
    def manifest(self) -> dict:
        """The output's manifest.json."""
        return json.loads((self.out / "manifest.json").read_text())


def compile_unmerged(family: str, base: Path, adapters: dict[str, Path], out: Path, **options) -> Unmerged:
    """Compile `adapters` into one onnx-cpu --unmerged output at `out` (more target options in `options`)."""
    needs_onnx_export()
    compile_adapter(list(adapters.values()), base, "onnx-cpu", out, unmerged=True, **options)
    return Unmerged(family, base, adapters, out)


def assert_each_file_matches_peft(case: Unmerged) -> None:
    """Prefill with each adapter file active matches PEFT; with none active (before and after), the base."""
    inputs = sample_inputs(case.family)
    base = base_logits(case.family, case.base, inputs)
    sess = session(case.out)
    assert max_diff(prefill(sess, inputs), base) <= ONNX_FP32_TOLERANCE
    for name, adapter in case.adapters.items():
        expected = peft_logits(case.family, case.base, adapter, inputs)
        got = prefill(sess, inputs, activate(case.adapter_file(name)))
        assert_matches(got, expected, base, ONNX_FP32_TOLERANCE)
    assert max_diff(prefill(sess, inputs), base) <= ONNX_FP32_TOLERANCE  # nothing stays active


def assert_decode_step_matches_peft(case: Unmerged, name: str) -> None:
    """A left-padded prefill then one decode step with adapter `name` active: PEFT's last logits."""
    ids = sample_inputs(case.family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    positions = positions_of(mask)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_model(case.family, case.base), case.adapters[name]).eval()
        expected = peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    sess, options = session(case.out), activate(case.adapter_file(name))
    first = step(sess, ids[:, :-1], mask[:, :-1], positions[:, :-1], run_options=options)
    last = step(sess, ids[:, -1:], mask, positions[:, -1:], past=first, run_options=options)
    assert max_diff(torch.from_numpy(last["logits"])[:, -1], expected) <= ONNX_FP32_TOLERANCE


def two_adapter_unmerged(base: Path, tmp: Path) -> Path:
    """A llama onnx-cpu --unmerged artifact with adapters `one` (defaults) and `two` (r 2, q and v)."""
    needs_onnx_export()
    one = make_adapter("llama", base, tmp / "one")
    two = make_adapter("llama", base, tmp / "two", seed=3, r=2, target_modules=["q_proj", "v_proj"])
    return compile_adapter([one, two], base, "onnx-cpu", tmp / "unmerged", unmerged=True).out


def write_onnx_adapter(path: Path, params: dict[str, np.ndarray], version: int) -> Path:
    """An onnxruntime adapter file holding `params` for the base export of model version `version`."""
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(version)
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    writer.export_adapter(str(path))
    return path
