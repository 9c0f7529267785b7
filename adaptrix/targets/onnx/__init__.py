"""The `onnx-cpu` and `onnx-cuda` targets: an onnxruntime model directory, merged or unmerged.

The base is exported once per (weights, dtype, task) and cached, by optimum where it is installed
(transformers 4.57), else by onnxruntime-genai's model builder (decoders it builds, transformers 5)
or torch.onnx (exporters.py says which, and the manifest records it); each compile
copies the cached graph and patches the adapter into it (merged; bottleneck adapters become
nodes), or adds LoRA and IA3 inputs and writes one `.onnx_adapter` file per adapter (`unmerged`;
LoHa and LoKr go there as their exact low-rank forms, IA3 as scale vectors).
Quantization, when asked for, comes last; then onnxruntime must load the written graph, or
nothing is renamed into place (loads.py).
The directory also holds the base's config and tokenizer files (optimum's ORTModel classes load
it) and, for decoders, genai_config.json (onnxruntime-genai runs it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import onnx
import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hashing import hash_files
from adaptrix.io.side_files import copy_side_files
from adaptrix.ir.bottleneck import refuse_bottlenecks
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.factored_low_rank import factored_as_low_rank
from adaptrix.ir.route import route_summary
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.head import new_head_sites, refuse_new_head
from adaptrix.lowering.module_pairs import LowRankPair, ModuleScales, low_rank_pairs, module_scales
from adaptrix.lowering.tensor_plan import plan_tensors
from adaptrix.targets.onnx.bottleneck import insert_bottlenecks, split_bottlenecks
from adaptrix.targets.onnx.builder_graph import builder_genai_config, builder_uses, refuse_on_builder
from adaptrix.targets.onnx.builder_patch import builder_patches
from adaptrix.targets.onnx.export import BUILDER_GENAI, DATA_NAME, MODEL_NAME, BaseExport, export_base
from adaptrix.targets.onnx.exporters import BUILDER, OPTIMUM, choose_exporter
from adaptrix.targets.onnx.external import write_model
from adaptrix.targets.onnx.fuse import fuse_attention
from adaptrix.targets.onnx.genai import write_genai_config
from adaptrix.targets.onnx.ia3 import add_scale_inputs, scale_parameters
from adaptrix.targets.onnx.lean import lean_decoder
from adaptrix.targets.onnx.loads import check_loads
from adaptrix.targets.onnx.lora import add_lora_inputs, model_version, write_adapter_files
from adaptrix.targets.onnx.patch import base_uses, merged_patches
from adaptrix.targets.onnx.quantize import quantize_weights
from adaptrix.targets.onnx.quantize_schemes import BLOCKED_SCHEMES, DEFAULT_BLOCK_SIZE, check_quantize
from adaptrix.targets.onnx.route import add_route_branches, routed_of, write_route_tensors
from adaptrix.targets.onnx.seq2seq import refuse_seq2seq_options, write_seq2seq_graphs
from adaptrix.targets.onnx.tasks import SEQ2SEQ_TASK, task_of
from adaptrix.targets.written import Written

__all__ = ["write_onnx"]

logger = logging.getLogger(__name__)


def write_onnx(
    ir: AdapterIR,
    base: Checkpoint,
    out: Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    target: str,
    adapters: Sequence[tuple[str, AdapterIR]] = (),
    unmerged: bool = False,
    quantize: str | None = None,
    block_size: int | None = None,
    cache_dir: Path | str | None = None,
    calibration: Path | str | None = None,
    phase: Callable[[str], None] = lambda label: None,
) -> Written:
    """Write the ONNX model directory for `target` (onnx-cpu or onnx-cuda) into `out`.

    With `calibration` (a prompts file: JSON token-id lists or text lines) the int4 / int8 blocks
    are rounded by GPTQ on the merged model's inputs over those prompts (gptq.py). `phase(label)`
    is told as each long phase begins.
    """
    adapters = list(adapters) or [("adapter", ir)]
    if len(adapters) > 1 and not unmerged:
        raise BadInputError(f"{len(adapters)} adapters given for one merged model",
                            fix="pass --unmerged to ship them as swappable adapter files")  # fmt: skip
    if quantize is not None and target != "onnx-cpu":
        raise UnsupportedError(
            f"--quantize {quantize} is for the CPU provider's edge targets",
            fix="use --target onnx-cpu, or leave out --quantize for onnx-cuda's float16",
        )
    check_quantize(quantize, block_size)
    _check_calibration(calibration, quantize, unmerged)
    prompts = None if calibration is None else _read_calibration(Path(calibration), base)
    block_size = block_size or DEFAULT_BLOCK_SIZE
    for _, each in adapters if unmerged else ():  # before the (slow) export
        refuse_bottlenecks(
            each,
            "--unmerged ONNX swaps LoRA inputs only; bottleneck adapters are graph nodes",
            fix="compile without --unmerged (bottlenecks go into the graph) or use --target hooks",
        )
    for _, each in adapters if unmerged else [("", ir)]:  # a head the base lacks: before the export too
        refuse_new_head(each, base, new_head_sites(each, base))
    ir, bottlenecks = split_bottlenecks(ir)
    if calibration is not None and bottlenecks:
        raise UnsupportedError("--calibration measures the merged model with LoRA ops only, not bottlenecks",
                               fix="leave out --calibration (round-to-nearest blocks)")  # fmt: skip
    dtype = dtype or torch.float32
    seq2seq = task_of(base) == SEQ2SEQ_TASK
    routed = routed_of(ir, base, unmerged=unmerged, quantize=quantize, seq2seq=seq2seq)
    if choose_exporter(base, task_of(base)) == BUILDER:  # what its graph cannot take: before the export
        refuse_on_builder(calibration=calibration, bottlenecks=bool(bottlenecks),
                          scales=any(module_scales(a, base) for _, a in adapters),
                          routed=routed is not None)  # fmt: skip
    if seq2seq:
        refuse_seq2seq_options(unmerged=unmerged, quantize=quantize, calibration=calibration,
                               bottlenecks=bool(bottlenecks))  # fmt: skip
    # What the adapters can be refused for is checked before the (slow, noisy) first export.
    # LoHa / LoKr stay unmerged as their exact low-rank forms: ordinary LoRA pairs; IA3 as vectors.
    pairs = [(name, low_rank_pairs(factored_as_low_rank(adapter), base, dtype, keep_scales=True))
             for name, adapter in adapters] if unmerged else []  # fmt: skip
    scales = [(name, module_scales(adapter, base)) for name, adapter in adapters] if unmerged else []
    phase("exporting the base to ONNX (first compile for this base)")  # a cached export: a moment
    provider = "cuda" if target == "onnx-cuda" else "cpu"
    export = export_base(base, str(dtype).removeprefix("torch."), cache_dir, provider, packed=not unmerged)
    if seq2seq:
        return _write_seq2seq(ir, base, export, out, dtype, phase)
    model = onnx.load(export.model, load_external_data=False)
    fused = None
    if target == "onnx-cpu" and export.task == "text-generation-with-past" and export.exporter == OPTIMUM:
        fused = fuse_attention(model, base)  # first: patches and LoRA branches find nodes by position
    section: dict = {"task": export.task, "exporter": export.exporter, "base_export": export.key,
                     "quantize": quantize}  # fmt: skip
    if quantize in BLOCKED_SCHEMES:
        section["block_size"] = block_size
    exclude: list[str] = []
    phase("adding the adapters' inputs to the graph" if unmerged else "merging the adapter into the graph")
    if unmerged:
        values, lora, exclude = _unmerged(pairs, scales, base, model, dtype, export, out)
        section["lora"] = lora
        untied = False
    elif routed is not None:
        values, untied = add_route_branches(model, base_uses(base, model.graph), routed), False
    elif export.exporter == BUILDER:
        values = builder_patches(ir, base, model, export.path, progress)
        untied = plan_tensors(ir, base)[1]
    else:
        values = merged_patches(ir, base, model, export.path, progress)
        untied = plan_tensors(ir, base)[1]
    if bottlenecks:  # last: the patches and the fusion above find nodes by position
        inserted = insert_bottlenecks(model, base, bottlenecks)
        values.update(inserted.values)
        exclude += inserted.matmuls  # kept in float: small, and exact
        section["bottlenecks"] = inserted.manifest
    if fused is not None:
        values.update(fused.values)
        section["attention"] = {"fused_layers": fused.layers, "declined": fused.declined}
    hessians = None if prompts is None else _hessians(base, ir, prompts, model)  # before q/k/v are packed
    if fused is not None:  # onnx-cpu decoders; last rewrite: every patch has found its nodes
        lean = lean_decoder(model, values, export.path)
        section["graph"] = lean.manifest
        hessians = lean.hessians(hessians)
    if quantize is not None:
        phase(
            f"quantizing the weights to {quantize}"
            + (" (GPTQ on the calibration prompts)" if calibration else "")
        )
        report = quantize_weights(model, export.path, values, quantize, block_size, exclude, hessians)
        section["quantized"] = {"weights": report.quantized, "float_bytes": report.float_bytes,
                                "quantized_bytes": report.quantized_bytes,
                                "left_in_float": report.skipped,
                                "rounding": "gptq" if calibration is not None else "nearest",
                                "gptq_weights": report.gptq}  # fmt: skip
        if calibration is not None:
            section["calibration"] = {"file": Path(calibration).name,
                                      "sha256": hash_files([Path(calibration)]).popitem()[1]}  # fmt: skip
    phase("writing the ONNX model")
    digests = {DATA_NAME: write_model(model, export.path, values, out, DATA_NAME)}
    files = [MODEL_NAME, DATA_NAME]
    if export.task == "text-generation-with-past":
        if export.exporter == BUILDER:
            genai = builder_genai_config(export.path / BUILDER_GENAI, out, MODEL_NAME)
        else:
            genai = write_genai_config(base, model.graph, out, target, MODEL_NAME)
        files += [genai] if genai else []
        section["genai_config"] = genai
    files += copy_side_files(base, out, dtype, untied)
    if unmerged:
        files += [entry["file"] for entry in section["lora"]["adapters"].values()]
    files += [write_route_tensors(routed, out)] if routed is not None else []
    section["inputs"] = [value.name for value in model.graph.input if value.name not in _lora_names(section)]
    section["outputs"] = [value.name for value in model.graph.output]
    check_loads(out / MODEL_NAME)  # last: a graph onnxruntime refuses is never renamed into place
    extra = {"route": route_summary(ir)} if routed is not None else {}
    return Written(files, {"onnx": section, **extra}, digests)


def _write_seq2seq(ir, base: Checkpoint, export: BaseExport, out: Path, dtype, phase) -> Written:
    """The merged adapter in each of optimum's seq2seq graphs, and the base's side files."""
    phase("merging the adapter into the encoder and decoder graphs")
    files, digests, section = write_seq2seq_graphs(ir, base, export, out)
    files += copy_side_files(base, out, dtype, plan_tensors(ir, base)[1])
    section = {"task": export.task, "exporter": export.exporter, "base_export": export.key, "quantize": None,
               **section}  # fmt: skip
    return Written(files, {"onnx": section}, digests)


def _check_calibration(calibration: Path | str | None, quantize: str | None, unmerged: bool) -> None:
    if calibration is None:
        return
    if quantize not in BLOCKED_SCHEMES or quantize == "int4-sym":  # GPTQ's symmetric 4-bit: not yet right
        raise BadInputError(f"--calibration rounds int4 / int8 blocks, and --quantize is {quantize}",
                            fix="add --quantize int4 or int8, or leave out --calibration")  # fmt: skip
    if unmerged:
        raise UnsupportedError("--calibration needs the merged model's weights",
                               fix="compile without --unmerged, or leave out --calibration")  # fmt: skip
    if not Path(calibration).is_file():
        raise BadInputError(f"--calibration {calibration}: no such file",
                            fix="give a JSON list of token-id lists, or a text file of prompts")  # fmt: skip


def _read_calibration(calibration: Path, base: Checkpoint) -> list[list[int]]:
    """The calibration prompts as token ids, read before the (slow) export so that a refusal comes first."""
    from adaptrix.calibration.prompts import read_prompts

    return read_prompts(str(calibration), base.path, base.source.vocab_size, what="--calibration")


def _hessians(base: Checkpoint, ir: AdapterIR, prompts: list[list[int]], model: onnx.ModelProto) -> dict:
    """GPTQ's H per quantizable weight initializer, from the merged PyTorch model on the calibration."""
    from adaptrix.targets.onnx.gptq import calibration_hessians

    modules = {use.initializer: tensor.removesuffix(".weight")
               for tensor, found in base_uses(base, model.graph).items() if tensor.endswith(".weight")
               for use in found}  # fmt: skip
    return calibration_hessians(base, ir, prompts, modules)


def _lora_names(section: dict) -> set[str]:
    return set(section.get("lora", {}).get("inputs", {}))


def _unmerged(pairs, scales, base: Checkpoint, model: onnx.ModelProto, dtype, export: BaseExport, out: Path):
    """LoRA and IA3 inputs for the union of the adapters' modules, and one adapter file per adapter."""
    union: dict[str, LowRankPair] = {}
    for _, found in pairs:
        for pair in found:
            union.setdefault(pair.placement.name, pair)
    scaled: dict[str, ModuleScales] = {}
    for _, found in scales:
        for each in found:
            seen = scaled.setdefault(each.placement.name, each)
            scaled[each.placement.name] = replace(
                seen, out=_either(seen.out, each.out), in_=_either(seen.in_, each.in_)
            )

    # IA3 first: the LoRA branches then read the scaled input and add before the output scale.
    def uses():  # read again after each insertion: node positions move
        if export.exporter == BUILDER:  # its unpacked graph: each module's MatMul reads its own weight
            return builder_uses(base, model, export.path, [pair.weight for pair in union.values()])
        return base_uses(base, model.graph)

    vectors = add_scale_inputs(model, uses(), list(scaled.values()))
    branches = add_lora_inputs(model, uses(), list(union.values()))
    version = model_version(export.key)
    lora = {
        "model_version": version,
        "inputs": {
            **{b.a: _input_entry(b, [b.in_features, "rank"]) for b in branches},
            **{b.b: _input_entry(b, ["rank", b.out_features]) for b in branches},
            **{v.name: _input_entry(v, [v.features]) for v in vectors},
        },
        "dtype": str(dtype).removeprefix("torch."),
        "adapters": write_adapter_files(pairs, branches, out, version,
                                        {name: scale_parameters(found, vectors) for name, found in scales}),
    }  # fmt: skip
    return {}, lora, [name for b in branches for name in b.nodes]


def _either(first, second):
    return first if first is not None else second


def _input_entry(branch, shape: list) -> dict:
    return {"shape": shape, "dtype": branch.dtype.name, "module": branch.module}
