"""compile(): frontend -> IR -> target, into an atomic output directory with a manifest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptrix.targets import target_named
from adaptrix.toolchain.checkpoint import Checkpoint
from adaptrix.toolchain.errors import AdaptrixError, BadInputError
from adaptrix.toolchain.frontends.peft import load_peft, lower_peft
from adaptrix.toolchain.frontends.peft_weights import read_peft
from adaptrix.toolchain.ir import AdapterIR
from adaptrix.toolchain.manifest import input_hashes, write_manifest
from adaptrix.toolchain.output import atomic_output

__all__ = ["CompileResult", "compile_adapter", "load", "parse_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class CompileResult:
    """What a compile produced."""

    out: Path
    target: str
    dtype: str
    files: list[str]
    sites: int


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A --dtype value as a torch dtype (None keeps the base's)."""
    if name is None:
        return None
    if name.lower() not in _DTYPES:
        raise BadInputError(f"unknown dtype {name!r}", fix=f"choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[name.lower()]


def load(adapter: Path | str, base: Path | str | Checkpoint) -> AdapterIR:
    """Read an adapter directory and lower it onto a base model into the IR."""
    checkpoint = base if isinstance(base, Checkpoint) else Checkpoint(base)
    return load_peft(adapter, checkpoint)


def compile_adapter(
    adapter: Path | str,
    base: Path | str,
    target: str,
    out: Path | str,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CompileResult:
    """Compile an adapter for a base into `out` with the named target; all or nothing."""
    emit = target_named(target)
    torch_dtype = parse_dtype(dtype) or emit.default_dtype
    checkpoint = Checkpoint(base)
    peft_adapter = read_peft(adapter)
    ir = lower_peft(peft_adapter, checkpoint)
    out_dtype = str(torch_dtype or checkpoint.dtype()).removeprefix("torch.")
    inputs = {"adapter": (Path(adapter), peft_adapter.files()), "base": (Path(base), checkpoint.files())}
    total = sum(info.nbytes for info in checkpoint.tensors.values())
    step = (lambda done: progress(done, total)) if progress else None
    with atomic_output(Path(out), force=force, inputs=[Path(adapter), Path(base)]) as tmp:
        try:
            written = emit.write(ir, checkpoint, tmp, dtype=torch_dtype, progress=step)
        except AdaptrixError as exc:
            raise exc.with_context(target) from None
        # Hashed after the merge, not beside it: on two cores a hashing thread slows the
        # merge's own threads by more than the hashing costs.
        write_manifest(
            tmp,
            target=target,
            dtype=out_dtype,
            inputs=input_hashes(inputs),
            passes=[],
            files=written.files,
            extra={"sites": len(ir.sites()), "source": ir.source.as_dict(), **written.manifest},
        )
    logger.info("compiled %s for %s into %s (%s)", adapter, base, out, target)
    return CompileResult(Path(out), target, out_dtype, written.files, len(ir.sites()))
