"""compile(): frontend -> IR -> target, into an atomic output directory with a manifest."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptrix.api.dequantized import dequantized_base
from adaptrix.api.manifest import input_hashes, write_manifest
from adaptrix.api.process import prepare_compile
from adaptrix.frontends.air.adapter import AirAdapter
from adaptrix.frontends.air.lower import fit_ir
from adaptrix.frontends.formats import lower_adapter, read_adapter, source_ir
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hub import resolve_base
from adaptrix.io.output import atomic_output
from adaptrix.io.output_guard import check_output
from adaptrix.ir.errors import AdaptrixError, BadInputError, UnsupportedError
from adaptrix.ir.route import refuse_routed
from adaptrix.ir.values import AdapterIR
from adaptrix.passes import parse_pass
from adaptrix.passes.runner import run_passes
from adaptrix.targets import TARGETS, Target, target_named

__all__ = ["CompileResult", "compile_adapter", "load", "parse_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip

_MERGE_INTO = ("dequantized",)  # what a quantized base is merged into (--requantize: then quantized again)
_PASS_FILES = ("source", "prompts")  # pass options that name a file or folder the pass reads


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
    """Read an adapter (PEFT directory or AIR file) and lower it onto a base model into the IR."""
    checkpoint = base if isinstance(base, Checkpoint) else Checkpoint(base)
    return lower_adapter(read_adapter(adapter), checkpoint)


def compile_adapter(
    adapter: Path | str | Sequence[Path | str],
    base: Path | str | None,
    target: str,
    out: Path | str,
    *,
    dtype: str | None = None,
    force: bool = False,
    passes: Sequence[str] = (),
    unmerged: bool = False,
    quantize: str | None = None,
    block_size: int | None = None,
    calibration: Path | str | None = None,
    cache_dir: Path | str | None = None,
    merge_into: str | None = None,
    qlora_base: Path | str | None = None,
    requantize: bool = False,
    progress: Callable[[int, int], None] | None = None,
    phase: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile adapters (PEFT directories or AIR files), after `passes` (`NAME:k=v,...`), into `out`.

    The ONNX targets take `unmerged` (LoRA and IA3 as swappable .onnx_adapter files), `quantize`
    ("int8", "int4", "int4-sym", "int8-dynamic") with `block_size` and `calibration` (a prompts file: GPTQ
    rounding), and `cache_dir` (where base exports are cached); another target refuses them.
    The merged and hooks targets take a bitsandbytes-quantized base, merged into its dequantized
    weights (`merge_into="dequantized"`, the default for such a base), and `qlora_base` (a
    quantization config file: a full-precision base's weights quantized as in QLoRA training);
    merged takes `requantize` (a quantized base's touched weights quantized again, its own scheme).

    `progress(done, total)` counts the bytes the target has written; `phase(label)` names each long
    phase as it begins (the ONNX targets' first export of a base takes minutes). `base` is a
    directory or a hub id in the local Hugging Face cache; None: the adapter's own base, if cached.
    """
    adapters = [Path(adapter)] if isinstance(adapter, str | Path) else [Path(a) for a in adapter]
    base = resolve_base(base, adapters)
    prepare_compile(base)  # the base's files hash on a thread while the rest is read and checked
    emit = target_named(target)
    given = {"unmerged": unmerged or None, "quantize": quantize, "block_size": block_size,
             "calibration": calibration, "cache_dir": cache_dir, "merge_into": merge_into,
             "qlora_base": qlora_base, "requantize": requantize or None}  # fmt: skip
    options: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    combining = any(parse_pass(text)[0].several for text in passes)
    _check_options(emit, adapters, options, combining)
    torch_dtype = parse_dtype(dtype) or emit.default_dtype
    checkpoint = Checkpoint(base, qlora_base=options.pop("qlora_base", None))
    _check_merge_into(options.pop("merge_into", None), checkpoint, emit)
    _check_requantize(requantize, checkpoint, dtype)
    given_base = checkpoint  # a quantized base: the ONNX targets read its dequantized copy
    if checkpoint.quantization is not None and emit.dequantized_copy:
        if phase is not None:
            phase("dequantizing the base (once; later compiles reuse it)")
        checkpoint = dequantized_base(checkpoint, options.get("cache_dir"))
    read = [read_adapter(path) for path in adapters]
    guarded = _read_paths(adapters, Path(base), options, passes)
    guarded += [Path(qlora_base)] if qlora_base is not None else []
    check_output(out, force=force, inputs=guarded)  # before the passes' slow work; again when writing
    irs, records = run_passes([source_ir(each, checkpoint) for each in read], passes, checkpoint)
    carried = any(ir.source != checkpoint.source for ir in irs)
    if carried or any(isinstance(each, AirAdapter) for each in read):
        # AIR and what passes carried are checked against the base here (a combined IR: by its first input)
        irs = [fit_ir(ir, checkpoint, path) for ir, path in zip(irs, adapters, strict=False)]
    if not emit.routes:
        refuse_routed(irs[0], f"--target {target} cannot route between adapters",
                      fix="use --target hooks, onnx-cpu or onnx-cuda")  # fmt: skip
    if emit.several:
        taken: set[str] = set()
        labels = [adapter_label(path, taken) for path in adapters]
        labels = labels if len(irs) == len(adapters) else ["combined"]
        options["adapters"] = list(zip(labels, irs, strict=True))
    out_dtype = str(torch_dtype or checkpoint.dtype()).removeprefix("torch.")
    inputs = {"adapter" if i == 0 else f"adapter.{i + 1}": (path, adapter_read.files())
              for i, (path, adapter_read) in enumerate(zip(adapters, read, strict=True))}  # fmt: skip
    inputs["base"] = (Path(base), given_base.files())
    if qlora_base is not None:
        inputs["qlora_base"] = (Path(qlora_base), [Path(qlora_base)])
    total = sum(info.nbytes for info in checkpoint.tensors.values())
    step = (lambda done: progress(done, total)) if progress else None
    files = [file for _, group in inputs.values() for file in group]  # an HF cache's links: their blobs
    with atomic_output(Path(out), force=force, inputs=[*guarded, *files]) as tmp:
        try:
            if phase is not None and emit.phases:
                options["phase"] = phase
            written = emit.write(irs[0], checkpoint, tmp, dtype=torch_dtype, progress=step, **options)
        except AdaptrixError as exc:
            raise exc.with_context(target) from None
        # Inputs are hashed here, or picked up where `adaptrix compile` began hashing them
        # before torch loaded (hash_early): beside the merge, a hashing thread would slow it.
        if phase is not None:
            phase("hashing the inputs for the manifest")
        write_manifest(
            tmp,
            target=target,
            dtype=out_dtype,
            inputs=input_hashes(inputs),
            passes=records,
            files=written.files,
            known=written.digests,
            extra={
                "sites": len(irs[0].sites()),
                "source": irs[0].source.as_dict(),
                **written.manifest,
                **_quantized_base(given_base, requantize),
            },
        )
    logger.info("compiled %s for %s into %s (%s)", adapter, base, out, target)
    return CompileResult(Path(out), target, out_dtype, written.files, len(irs[0].sites()))


def _check_options(
    emit: Target, adapters: list[Path], options: Mapping[str, object], combining: bool
) -> None:
    """Options and adapter counts the target does not take are errors, never ignored."""
    known = sorted({key for t in TARGETS.values() for key in t.options})
    for key, value in options.items():
        if key not in emit.options and value is not False:
            flag = "--" + str(key).replace("_", "-")
            users = [t.name for t in TARGETS.values() if key in t.options]
            if not users:
                raise BadInputError(f"unknown option {key!r} ({flag}): no target takes it",
                                    fix=f"check the spelling; options: {', '.join(known)}")  # fmt: skip
            raise BadInputError(f"{flag} does not apply to --target {emit.name}",
                                fix=f"it applies to: {', '.join(users)}")  # fmt: skip
    if len(adapters) > 1 and not emit.several and not combining:
        raise BadInputError(f"--target {emit.name} takes one adapter, {len(adapters)} were given",
                            fix="compile them one at a time, or into one with --pass combine")  # fmt: skip


def _check_merge_into(merge_into: str | None, checkpoint: Checkpoint, emit: Target) -> None:
    """A quantized base goes only to the targets that read it, merged into its dequantized weights."""
    if merge_into is not None and merge_into not in _MERGE_INTO:
        raise BadInputError(f"unknown --merge-into {merge_into!r}",
                            fix=f"choose one of: {', '.join(_MERGE_INTO)}")  # fmt: skip
    if checkpoint.quantization is None:
        if merge_into is not None:
            raise BadInputError(f"--merge-into {merge_into} needs a quantized base", path=checkpoint.path,
                                fix="for a full-precision base: --qlora-base CONFIG")  # fmt: skip
        return
    copied = emit.dequantized_copy and checkpoint.quantization.mode == "dequantized"
    if "qlora_base" not in emit.options and not copied:
        raise UnsupportedError(f"--target {emit.name} does not take a quantized base", path=checkpoint.path,
                               fix="compile to merged first, then from the merged model")  # fmt: skip


def _check_requantize(requantize: bool, checkpoint: Checkpoint, dtype: str | None) -> None:
    """--requantize needs a quantized base, and keeps its dtypes."""
    if not requantize:
        return
    if checkpoint.quantization is None or checkpoint.quantization.mode != "dequantized":
        raise BadInputError("--requantize needs a bitsandbytes-quantized base", path=checkpoint.path,
                            fix="leave out --requantize")  # fmt: skip
    if dtype is not None:
        raise BadInputError("--requantize keeps the base's dtypes", fix="leave out --dtype")


def _quantized_base(checkpoint: Checkpoint, requantize: bool) -> dict:
    """The manifest's record of a quantized or --qlora-base base: merge mode and scheme."""
    if checkpoint.quantization is None:
        return {}
    return {"quantized_base": checkpoint.quantization.manifest(requantized=requantize)}


def _read_paths(
    adapters: list[Path], base: Path, options: Mapping[str, object], passes: Sequence[str]
) -> list[Path]:
    """Every path the compile reads: adapters, base, calibration prompts, the files passes name."""
    paths = [*adapters, base]
    if options.get("calibration") is not None:
        paths.append(Path(str(options["calibration"])))
    for text in passes:
        _, parsed = parse_pass(text)
        paths += [
            Path(value)
            for name in _PASS_FILES
            if isinstance(value := getattr(parsed, name, None), str) and value
        ]
    return paths


def adapter_label(path: Path, taken: set[str]) -> str:
    """A file-safe, unique name for an adapter, from its directory's name as resolved (`x/..` too)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(os.path.realpath(path)).name).strip(".-") or "adapter"
    if name in taken:
        raise BadInputError(f"two adapters are named {name!r}", path=path,
                            fix="give the adapter directories different names")  # fmt: skip
    taken.add(name)
    return name
