"""Builders for the passes tests: adapter pairs, compiles with passes, their records, refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from builders import model_logits, peft_logits, prompts_file, sample_inputs
from typer.testing import CliRunner

import adaptrix
from adaptrix.api.compile import compile_adapter
from adaptrix.api.convert import convert_adapter
from adaptrix.cli import app
from adaptrix.ir.errors import AdaptrixError

__all__ = [
    "Carry",
    "air_of",
    "assert_carry_refused",
    "assert_dora_refused",
    "assert_pass_option_refused",
    "bias_pair",
    "carry_case",
    "compiled_logits",
    "gap_to_peft",
    "pass_records",
]

runner = CliRunner()


def bias_pair(adapters, family: str = "gpt2") -> tuple[Path, Path]:
    """Two LoRA adapters that also train the biases (bias="lora_only"): ranks 4 and 3."""
    return adapters(family, bias="lora_only"), adapters(family, seed=3, r=3, bias="lora_only")


def compiled_logits(adapters, base: Path, out: Path, passes: list[str], family: str = "llama"):
    """Logits of the float32 merged model compiled from `adapters` with `passes`."""
    compile_adapter(adapters, base, "merged", out, dtype="float32", passes=passes)
    return model_logits(family, out, sample_inputs(family))


def gap_to_peft(got: torch.Tensor, source: Path, adapter: Path, family: str = "llama") -> float:
    """max |got - PEFT's logits of `adapter` on its `source` base| on the sample inputs."""
    return float((got - peft_logits(family, source, adapter, sample_inputs(family))).abs().max())


def air_of(adapter: Path, path: Path, base: Path | None = None) -> Path:
    """`adapter` converted to an AIR file at `path`."""
    return convert_adapter(adapter, "air", path, base=base).out


def pass_records(out: Path) -> list[dict]:
    """The pass records of the manifest in `out`."""
    return json.loads((out / "manifest.json").read_text())["passes"]


def assert_pass_option_refused(args: list, out: Path, words: str) -> None:
    """`adaptrix ARGS -o OUT` exits 2 with one line on stderr holding `words`, and writes no `out`."""
    result = runner.invoke(app, [*(str(arg) for arg in args), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


class Carry(NamedTuple):
    """A llama adapter made on `source`, a `target` base to carry it to, prompts, and a folder for outputs."""

    source: Path
    target: Path
    adapter: Path
    prompts: Path
    tmp: Path

    def prompt_ids(self) -> torch.Tensor:
        """The prompts as a [count, length] tensor of token ids."""
        return torch.tensor(json.loads(self.prompts.read_text()))


def carry_case(bases, adapters, tmp: Path, make_target: Callable[[Path, Path], Path], prompts: int) -> Carry:
    """The shared llama base as the source, `make_target(source, tmp / "target")`, `prompts` prompts."""
    source = bases("llama")
    target = make_target(source, tmp / "target")
    prompts_file(tmp / "prompts.json", prompts)
    return Carry(source, target, adapters("llama"), tmp / "prompts.json", tmp)


def assert_carry_refused(case: Carry, spec: str, match: str) -> None:
    """Compiling the case's adapter onto its target with the pass `spec` raises an error matching `match`."""
    with pytest.raises(AdaptrixError, match=match):
        adaptrix.compile_adapter(
            case.adapter, case.target, "hooks", case.tmp / "err", passes=[spec], force=True
        )


def assert_dora_refused(case: Carry, adapters, name: str) -> None:
    """Pass `name` refuses a DoRA adapter: it carries LoRA only."""
    dora = adapters("llama", use_dora=True)
    with pytest.raises(AdaptrixError, match=f"{name} carries LoRA"):
        adaptrix.compile_adapter(
            dora,
            case.target,
            "hooks",
            case.tmp / "err2",
            passes=[f"{name}:source={case.source},prompts={case.prompts}"],
        )
