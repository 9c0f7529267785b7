"""adaptrix parity: run compiled artifacts, each with its own runtime, against PEFT's own forward.

The reference is PEFT's unmerged forward in float32 on the same inputs (an AIR adapter is first
re-exported as PEFT onto the base). Each backend is compiled into a work directory, or taken
already compiled (`artifacts`), and run as a user would run it: `merged` with transformers,
`hooks` attached to the plain base, `onnx-cpu` / `onnx-cuda` with onnxruntime. Per backend the
report gives the max absolute and relative difference of the outputs, greedy top-1 agreement and
the mean KL divergence of the softmax (for logits), and whether it is inside its tolerance: `ok`
is True or False where a tolerance applies, None where none does (a quantized artifact without
--tolerance: reported, not judged). A backend that cannot be compiled or run is a row too, with
ok False and a note saying why; every target is reported whatever happens to the others.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from adaptrix.api.parity_run import BACKENDS, artifact_manifest, reference_outputs, run_backend
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hub import resolve_base
from adaptrix.io.jsonfile import read_json
from adaptrix.io.output_guard import check_outside_inputs
from adaptrix.ir.errors import AdaptrixError, BadInputError

__all__ = ["SCHEMA", "BackendResult", "ParityReport", "default_tolerance", "parity", "read_inputs"]

logger = logging.getLogger(__name__)

SCHEMA = 1
# Max |diff| of outputs against PEFT's float32 forward, relative to max |reference| (at least 1):
# the bound a correct artifact of that kind meets. See docs/parity.md for why each is what it is.
TOLERANCES = {
    ("merged", "float32"): 1e-4,  # same maths, rounding order differs (merged W vs x W + x A B)
    ("hooks", "float32"): 1e-4,  # the same LoRA maths as PEFT, in another kernel order
    ("onnx", "float32"): 5e-4,  # onnxruntime fuses attention, layer norm and GELU kernels
    ("gguf", "float32"): 1e-3,  # llama.cpp: GELU by a float16 table of the tanh approximation (4e-4)
    ("any", "float16"): 1e-2,  # 11-bit mantissa: each of a few hundred roundings ~5e-4 relative
    ("any", "bfloat16"): 5e-2,  # 8-bit mantissa: 4e-3 per rounding
}
DEFAULT_SHAPE = (2, 16)


@dataclass(frozen=True, slots=True)
class BackendResult:
    """One backend against the reference.

    `ok`: inside its tolerance (True), outside it or not compiled / run (False), or not judged
    because no tolerance applies (None). `max_abs` / `max_rel` are None where nothing was compared.
    """

    target: str
    artifact: str
    dtype: str | None
    max_abs: float | None
    max_rel: float | None
    top1_agreement: float | None
    kl: float | None
    tolerance: float | None
    ok: bool | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class ParityReport:
    """What `adaptrix parity` found; `as_json()` is the stable --json schema."""

    adapter: str
    base: str
    output: str
    inputs: Mapping[str, object]
    backends: tuple[BackendResult, ...]
    reference: str = "peft"  # whose forward is the ground truth: peft, or adapterhub

    @property
    def ok(self) -> bool:
        """Whether no backend failed: each is inside its tolerance or not judged (ok None)."""
        return all(result.ok is not False for result in self.backends)

    def as_json(self) -> dict:
        """{schema, reference, adapter, base, output, inputs, ok, backends: [...]}."""
        return {"schema": SCHEMA, "reference": self.reference, "adapter": self.adapter, "base": self.base,
                "output": self.output, "inputs": dict(self.inputs), "ok": self.ok,
                "backends": [_strict(asdict(result)) for result in self.backends]}  # fmt: skip


def _strict(row: dict) -> dict:
    """A row as strict JSON: a measure that is not finite (NaN, inf outputs) becomes null."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in row.items()}  # fmt: skip


def default_tolerance(target: str, dtype: str, quantized: bool) -> float | None:
    """The default bound for a backend's artifact; None for quantized ones (reported, not judged)."""
    if quantized:
        return None
    family = "onnx" if target.startswith("onnx") else target
    return TOLERANCES.get((family, dtype)) or TOLERANCES.get(("any", dtype))


def read_inputs(path: Path | None, vocab_size: int) -> dict[str, torch.Tensor]:
    """Token ids and a mask: seeded random ids of DEFAULT_SHAPE, or read from a JSON file.

    The file holds a list of equal-length id lists, or {"input_ids": ..., "attention_mask": ...}.
    """
    if path is None:
        ids = torch.randint(0, vocab_size, DEFAULT_SHAPE, generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    data = read_json(path, what="JSON list of token ids")
    rows = data.get("input_ids") if isinstance(data, dict) else data
    fix = 'write [[1, 2, 3], [4, 5, 6]] or {"input_ids": [[...]], "attention_mask": [[...]]}'
    if not (isinstance(rows, list) and rows and all(isinstance(row, list) and row for row in rows)):
        raise BadInputError("holds no list of token id lists", path=path, fix=fix)
    if len({len(row) for row in rows}) != 1 or not all(isinstance(i, int) for row in rows for i in row):
        raise BadInputError("token id lists must be integers, all of one length", path=path, fix=fix)
    ids = torch.tensor(rows, dtype=torch.long)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise BadInputError(f"has token ids outside the base's vocabulary of {vocab_size}", path=path)
    mask = data.get("attention_mask") if isinstance(data, dict) else None
    mask_tensor = torch.ones_like(ids) if mask is None else torch.tensor(mask, dtype=torch.long)
    if mask_tensor.shape != ids.shape:
        raise BadInputError("attention_mask does not have the shape of input_ids", path=path, fix=fix)
    return {"input_ids": ids, "attention_mask": mask_tensor}


def parity(
    adapter: Path | str,
    base: Path | str | None,
    targets: Sequence[str],
    *,
    inputs: Path | str | None = None,
    tolerances: Mapping[str, float] | None = None,
    artifacts: Mapping[str, Path | str] | None = None,
    work_dir: Path | str | None = None,
    compile_fn: Callable[..., object] | None = None,
) -> ParityReport:
    """Compile (or take) one artifact per target, run each, and compare with PEFT's forward."""
    unknown = [t for t in [*targets, *(artifacts or {})] if t not in BACKENDS]
    if unknown:
        raise BadInputError(
            f"unknown parity target {unknown[0]!r}", fix=f"choose from: {', '.join(BACKENDS)}"
        )
    if not targets and not artifacts:
        raise BadInputError("no targets to check", fix="give --targets merged,hooks,onnx-cpu")
    given = {target: Path(path) for target, path in (artifacts or {}).items()}
    for target, path in given.items():
        artifact_manifest(target, path)
    base = resolve_base(base, [Path(adapter)])
    checkpoint = Checkpoint(base)
    feeds = read_inputs(Path(inputs) if inputs else None, checkpoint.source.vocab_size)
    if work_dir is not None:
        read = [adapter, base, *([inputs] if inputs else [])]
        check_outside_inputs(work_dir, read, "a --work-dir", replaced=False)  # it gets a fresh folder
    with tempfile.TemporaryDirectory(prefix="adaptrix-parity-", dir=work_dir) as scratch:
        root = Path(scratch)
        expected, reference = reference_outputs(Path(adapter), checkpoint, feeds, root)
        judge = _Judge(checkpoint, feeds, expected, tolerances or {})
        build = partial(_compile, compile_fn, adapter, base)
        results = [judge.given(target, path) for target, path in given.items()]
        results += [judge.compiled(target, root / target, build) for target in targets if target not in given]
    shape = list(feeds["input_ids"].shape)
    given_inputs = {"shape": shape, "file": str(inputs) if inputs else None}
    output = "logits" if expected.dim() == 3 else "outputs"
    return ParityReport(str(adapter), str(base), output, given_inputs, tuple(results), reference)


def _compile(compile_fn, adapter, base, target: str, out: Path) -> None:
    if compile_fn is None:
        from adaptrix.api.compile import compile_adapter as compile_fn
    compile_fn(adapter, base, target, out)


@dataclass(frozen=True, slots=True)
class _Judge:
    """Runs one backend after another against the reference; a failure becomes that backend's row."""

    checkpoint: Checkpoint
    feeds: dict[str, torch.Tensor]
    expected: torch.Tensor
    tolerances: Mapping[str, float]

    def compiled(self, target: str, out: Path, build: Callable[[str, Path], None]) -> BackendResult:
        """Compile with `build(target, out)`, then run and judge; a compile that fails is a failed row."""
        try:
            build(target, out)
        except Exception as exc:  # every target gets its row: the note says why
            return _failed(target, out, "could not compile", exc)
        return self.given(target, out)

    def given(self, target: str, path: Path) -> BackendResult:
        """Run a compiled artifact and judge it; a run that fails is a failed row."""
        try:
            run = run_backend(target, path, self.checkpoint, self.feeds)
        except Exception as exc:  # every target gets its row: the note says why
            return _failed(target, path, "could not run", exc)
        mask = self.feeds["attention_mask"]
        return _judge(target, path, run, self.expected, mask, self.tolerances)


def _failed(target: str, path: Path, stage: str, exc: Exception) -> BackendResult:
    """The row of a backend that could not be compiled or run."""
    logger.debug("parity %s: %s", target, stage, exc_info=True)
    if isinstance(exc, AdaptrixError):
        why = exc.line()
    else:
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return BackendResult(target, str(path), None, None, None, None, None, None, False, f"{stage}: {why}")


def _judge(target: str, path: Path, run, expected: torch.Tensor, mask: torch.Tensor,
           tolerances: Mapping[str, float]) -> BackendResult:  # fmt: skip
    """Compare one backend's outputs with the reference and apply its tolerance."""
    got, dtype, quantized, note = run
    got, ref = got.double(), expected.double()
    if got.shape != ref.shape:
        why = f"output shape {list(got.shape)} differs from PEFT's {list(ref.shape)}"
        return BackendResult(target, str(path), dtype, None, None, None, None, None, False, why)
    diff = (got - ref).abs()
    max_abs = float(diff.max())
    max_rel = max_abs / max(1.0, float(ref.abs().max()))
    top1 = kl = None
    if ref.dim() == 3 and expected.shape[-1] > 1:  # logits over a vocabulary: per position
        keep = mask.bool().reshape(-1)
        flat_ref, flat_got = ref.reshape(-1, ref.shape[-1])[keep], got.reshape(-1, got.shape[-1])[keep]
        top1 = float((flat_ref.argmax(-1) == flat_got.argmax(-1)).double().mean())
        log_p, log_q = flat_ref.log_softmax(-1), flat_got.log_softmax(-1)
        kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    elif ref.dim() == 2 and ref.shape[-1] > 1:  # a classifier's logits
        top1 = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
    bound = tolerances.get(target, tolerances.get("*", default_tolerance(target, dtype, quantized)))
    ok = None if bound is None else bool(np.isfinite(max_rel) and max_rel <= bound)
    return BackendResult(target, str(path), dtype, max_abs, max_rel, top1, kl, bound, ok, note)
