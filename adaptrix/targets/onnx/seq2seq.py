"""A merged adapter in every graph of optimum's seq2seq export (T5, BART, ...).

optimum exports an encoder-decoder as three graphs: `encoder_model`, `decoder_model` (the first
step: it computes the cross-attention keys and values from the encoder's output) and
`decoder_with_past_model` (later steps: it reads them from the past). A weight may be read by
several of them (the shared embedding, the decoder's self-attention and MLP) or by one only
(the cross-attention's k and v, by `decoder_model`): each graph is patched where it reads the
tensor, and a tensor the adapter changes that no graph reads is refused. The output holds the
three graphs, each with its own weights file, which optimum's ORTModelForSeq2SeqLM loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.tensor_plan import plan_tensors
from adaptrix.targets.onnx.dead import absent_from_graphs
from adaptrix.targets.onnx.export import BaseExport, data_name, model_name
from adaptrix.targets.onnx.external import write_model
from adaptrix.targets.onnx.loads import check_loads
from adaptrix.targets.onnx.patch import merged_patches, unused_tensor

__all__ = ["refuse_seq2seq_options", "write_seq2seq_graphs"]

logger = logging.getLogger(__name__)


def refuse_seq2seq_options(
    *, unmerged: bool, quantize: str | None, calibration: object, bottlenecks: bool
) -> None:
    """Refuse (one line) what the seq2seq graphs do not take yet, before the export."""
    asked = [name for name, on in (("--unmerged", unmerged), ("--quantize", quantize is not None),
                                   ("--calibration", calibration is not None),
                                   ("bottleneck adapters", bottlenecks)) if on]  # fmt: skip
    if asked:
        raise UnsupportedError(
            f"{asked[0]} is not supported for encoder-decoder (seq2seq) ONNX graphs",
            fix="compile the merged LoRA-style adapter without it, or use --target merged or hooks",
        )


def write_seq2seq_graphs(
    ir: AdapterIR, base: Checkpoint, export: BaseExport, out: Path
) -> tuple[list[str], dict[str, str], dict]:
    """Patch and write each graph of the export into `out`: (files, {data file: sha256}, section)."""
    patched: set[str] = set()
    models: dict[str, onnx.ModelProto] = {}
    values: dict[str, dict] = {}
    for graph in export.graphs:
        model = onnx.load(export.path / model_name(graph), load_external_data=False)
        scope = "encoder." if graph == "encoder_model" else "decoder."
        values[graph] = merged_patches(ir, base, model, export.path, patched=patched, scope=scope)
        models[graph] = model
        logger.info("%s: %d tensors patched", graph, len(values[graph]))
    items, _ = plan_tensors(ir, base)
    every = list(models.values())
    for item in (item for item in items if item.touched and item.name not in patched):
        if not absent_from_graphs(item.name, item.source, base, every, export.path):
            raise unused_tensor(item.name, base)
    files, digests, graphs = [], {}, {}
    for graph, model in models.items():
        data, file = data_name(graph), model_name(graph)
        digests[data] = write_model(model, export.path, values[graph], out, data, model_name=file)
        files += [model_name(graph), data]
        graphs[graph] = {
            "file": model_name(graph),
            "inputs": [value.name for value in model.graph.input],
            "outputs": [value.name for value in model.graph.output],
        }
    for graph in models:
        check_loads(out / model_name(graph))
    first_step = graphs["decoder_model"]  # what adaptrix's runtime runs after the encoder (parity)
    return files, digests, {"graphs": graphs, **{key: first_step[key] for key in ("inputs", "outputs")}}
