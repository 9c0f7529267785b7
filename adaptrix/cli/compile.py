"""`adaptrix compile` and `adaptrix convert`: the commands that write artifacts."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Annotated

import typer

from adaptrix.api.process import prepare_compile
from adaptrix.cli.base import app, call, err, out
from adaptrix.cli.progress import CompileProgress
from adaptrix.io.hub import resolve_base
from adaptrix.ir.errors import BadInputError

__all__ = ["compile_command", "convert_command"]


@app.command("compile")
def compile_command(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT adapter directories or AIR files.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model: a directory, or a hub id in the local Hugging Face cache "
            "(default: the adapter's base_model_name_or_path, if cached).",
        ),
    ] = None,
    target: Annotated[str, typer.Option("--target", help="Target; see `adaptrix targets`.")] = "merged",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Output dtype (default: the target's).")
    ] = None,
    unmerged: Annotated[
        bool, typer.Option("--unmerged", help="ONNX, gguf: LoRA (ONNX: IA3 too) as swappable adapter files.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option("--quantize", help="ONNX: int8 int4 int4-sym int8-dynamic; gguf: f32 f16 q8_0 q4_0 ..."),
    ] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="ONNX int8 / int4: block size (32).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="ONNX: where base exports are cached.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="ONNX int4 / int8: prompts file; blocks rounded by GPTQ on them."),
    ] = None,
    merge_into: Annotated[
        str | None,
        typer.Option("--merge-into", help="A bitsandbytes-quantized base: dequantized (the default)."),
    ] = None,
    qlora_base: Annotated[
        Path | None,
        typer.Option(
            "--qlora-base",
            help="The training's quantization config (JSON): a full-precision "
            "base quantized as in QLoRA before merging.",
        ),
    ] = None,
    requantize: Annotated[
        bool,
        typer.Option("--requantize", help="A bitsandbytes base: merged, then quantized again."),
    ] = False,
    passes: Annotated[
        list[str] | None,
        typer.Option("--pass", help="Pass NAME[:key=value,...] to run before the target; repeat, in order."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Compile ADAPTERS for BASE into OUTPUT."""
    call(lambda: _refuse_flag_values(adapters))
    base = call(lambda: resolve_base(base, adapters))
    call(lambda: prepare_compile(base))  # before torch loads (adaptrix.api.process)
    from adaptrix.api.compile import compile_adapter

    gc.freeze()  # the modules just imported are never garbage: collections during the compile skip them
    kwargs = {"dtype": dtype, "force": force, "passes": passes or (), "unmerged": unmerged,
              "quantize": quantize, "block_size": block_size, "cache_dir": cache_dir,
              "calibration": calibration, "merge_into": merge_into, "qlora_base": qlora_base,
              "requantize": requantize}  # fmt: skip
    with CompileProgress(err, enabled=not as_json) as bar:
        result = call(lambda: compile_adapter(adapters, base, target, output, progress=bar.advance,
                                              phase=bar.phase, **kwargs), writing=output)  # fmt: skip
    if as_json:
        out.print_json(json.dumps({"output": str(result.out), "target": result.target,
                                   "dtype": result.dtype, "quantize": quantize, "files": result.files,
                                   "sites": result.sites}))  # fmt: skip
    else:
        numbers = result.dtype if quantize is None else _quantized(result.dtype, quantize)
        out.print(f"wrote {result.out} ({result.target}, {numbers}, {result.sites} sites)",
                  markup=False, highlight=False)  # fmt: skip


def _refuse_flag_values(adapters: list[Path]) -> None:
    """`--force true`: typer reads `true` as one more adapter; say that flags take no value."""
    for path in adapters:
        if str(path).lower() in ("true", "false", "yes", "no", "1", "0") and not path.exists():
            raise BadInputError(f"{str(path)!r} is not an adapter: --force, --unmerged and --json are flags "
                                "and take no value", fix=f"leave out {str(path)!r}")  # fmt: skip


def _quantized(dtype: str, scheme: str) -> str:
    """What a quantized artifact computes with: `float32 activations, int4 weights`."""
    weights = {"int8-dynamic": "int8 weights, dynamically quantized activations"}.get(scheme)
    return f"{dtype} activations, {weights or scheme + ' weights'}"


@app.command("convert")
def convert_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter directory or AIR file.")],
    to: Annotated[str, typer.Option("--to", help="air (one file) or peft (a directory).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (air) or directory (peft).")],
    base: Annotated[Path | None, typer.Option("--base", help="Base model: required for AIR to PEFT.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Re-export ADAPTER as an AIR file or a PEFT adapter directory."""
    from adaptrix.api.convert import convert_adapter

    result = call(lambda: convert_adapter(adapter, to, output, base=base, force=force), writing=output)
    if as_json:
        out.print_json(json.dumps({"output": str(result.out), "to": result.to, "files": result.files,
                                   "sites": result.sites,
                                   "base": None if result.base is None else str(result.base)}))  # fmt: skip
    else:
        out.print(f"wrote {result.out} ({result.to}, {result.sites} sites)", markup=False, highlight=False)
