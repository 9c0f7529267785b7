"""The base model exported to ONNX once, and cached by what it was built from.

The exporter (optimum, onnxruntime-genai's model builder or torch.onnx) is chosen from what is
installed (exporters.py). The cache key is the sha256 of the base's weight and config files, the
ONNX dtype, the export task, the exporter, the provider a builder graph is built for, and the
versions of the exporting libraries. A cached export holds `model.onnx` with every
weight in `model.onnx_data`, unquantized; each compile for the same base patches a copy of it.
A seq2seq export holds optimum's three graphs instead (`encoder_model`, `decoder_model`,
`decoder_with_past_model`, each `.onnx` with its own `.onnx_data`), as ORTModelForSeq2SeqLM loads them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from adaptrix.artifacts import DATA_NAME, MANIFEST_NAME, MODEL_NAME
from adaptrix.io.cache_dirs import cache_root, make_cache_root
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hashing import files_key
from adaptrix.io.output import atomic_entry
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.targets.onnx.export_outputs import export_kwargs
from adaptrix.targets.onnx.exporters import (
    BUILDER,
    EXPORT_FAILURES,
    OPTIMUM,
    choose_exporter,
    export_failed,
    exporter_versions,
)
from adaptrix.targets.onnx.float16 import to_float16
from adaptrix.targets.onnx.tasks import CAUSAL_TASK, SEQ2SEQ_TASK, check_exportable, task_of
from adaptrix.targets.onnx.torch_export import torch_export

__all__ = [
    "BUILDER_GENAI",
    "DATA_NAME",
    "EXPORT_FORMAT",
    "MODEL_NAME",
    "SEQ2SEQ_GRAPHS",
    "BaseExport",
    "data_name",
    "export_base",
    "model_name",
    "task_of",
]

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 6  # bump when the cached layout or the graph rewrites change
_DTYPES = ("float32", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".json")
_PLAIN_GRAPHS = ("model",)
BUILDER_GENAI = "builder_genai_config.json"  # the builder's own genai_config.json, kept with its graph
# optimum's seq2seq graphs, unmerged (its merged decoder holds both decoders in If subgraphs)
SEQ2SEQ_GRAPHS = ("encoder_model", "decoder_model", "decoder_with_past_model")


def model_name(graph: str) -> str:
    """The file of graph `graph` ("model" -> model.onnx)."""
    return MODEL_NAME if graph == "model" else f"{graph}.onnx"


def data_name(graph: str) -> str:
    """The external weights file of graph `graph` ("model" -> model.onnx_data)."""
    return DATA_NAME if graph == "model" else f"{graph}.onnx_data"


@dataclass(frozen=True, slots=True)
class BaseExport:
    """A cached, unquantized export of one base: graph, weights and what it was built from."""

    path: Path
    key: str
    task: str
    dtype: str
    exporter: str = OPTIMUM

    @property
    def graphs(self) -> tuple[str, ...]:
        """The export's graphs: ("model",), or optimum's three seq2seq graphs."""
        return SEQ2SEQ_GRAPHS if self.task == SEQ2SEQ_TASK else _PLAIN_GRAPHS

    @property
    def model(self) -> Path:
        """The cached graph (a seq2seq export's first: its encoder)."""
        return self.path / model_name(self.graphs[0])

    @property
    def data(self) -> Path:
        """The cached graph's weights."""
        return self.path / data_name(self.graphs[0])


def export_key(
    base: Checkpoint,
    dtype: str,
    task: str,
    exporter: str = OPTIMUM,
    provider: str = "cpu",
    packed: bool = True,
) -> str:
    """The cache key: the base's files, the dtype, the task, the exporter and its libraries' versions."""
    files = [f for f in base.files() if f.name.endswith(_WEIGHT_SUFFIXES) and f.name != MANIFEST_NAME]
    return files_key(
        files,
        format=EXPORT_FORMAT,
        dtype=dtype,
        task=task,
        exporter=exporter,
        provider=provider if exporter == BUILDER else "any",
        packed=packed or exporter != BUILDER,
        versions=exporter_versions(exporter),
    )


def export_base(
    base: Checkpoint,
    dtype: str,
    cache_dir: Path | str | None = None,
    provider: str = "cpu",
    packed: bool = True,
) -> BaseExport:
    """The cached export of `base` in `dtype` (float32 or float16), exporting it on first use.

    `provider` (cpu or cuda) and `packed` (q / k / v in one MatMul) matter to onnxruntime-genai's
    builder only, which builds per provider and packs q / k / v unless told not to.
    """
    if dtype not in _DTYPES:
        raise UnsupportedError(
            f"ONNX targets emit float32 or float16, not {dtype}",
            fix="pass --dtype fp32 or --dtype fp16",
        )
    task = task_of(base)
    exporter = choose_exporter(base, task)
    key = export_key(base, dtype, task, exporter, provider, packed)
    root = cache_root("onnx", cache_dir)
    entry = root / key[:32]
    cached = BaseExport(entry, key, task, dtype, exporter)
    if _complete(cached):
        logger.info("using the cached ONNX export %s", entry)
        return cached
    if exporter == OPTIMUM:
        check_exportable(base, task)  # a family optimum cannot export: one line, before its long error
    make_cache_root(root)
    if os.path.lexists(entry):
        if _complete(cached):  # another process finished the same export since the check above
            return cached
        raise _in_the_way(entry)
    with atomic_entry(entry) as tmp:  # a killed export leaves nothing: its watcher, or the next export
        _run_export(exporter, base, task, dtype, tmp, provider, packed)
        record = {"key": key, "task": task, "dtype": dtype, "exporter": exporter, "base": str(base.path)}
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    if not (entry / "export.json").is_file():
        raise _in_the_way(entry)
    return cached


def _complete(export: BaseExport) -> bool:
    """Whether a cache entry holds every graph of the export and its record."""
    entry = export.path
    return all((entry / model_name(g)).is_file() for g in export.graphs) and (entry / "export.json").is_file()


def _in_the_way(entry: Path) -> BadInputError:
    return BadInputError("is in the way of the cached export and is not a complete one", path=entry,
                         fix="remove it, or pass another --cache-dir")  # fmt: skip


def _to_float16(path: Path) -> onnx.ModelProto:
    """A float32 model file as float16 (inputs and outputs included), weights loaded.

    What the model computes in float32 stays in float32 (adaptrix.targets.onnx.float16).
    """
    inferred = path.with_name("inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))  # works past protobuf's 2 GB
    return to_float16(onnx.load(inferred, load_external_data=True))


def _export(base: Checkpoint, task: str, dtype: str, into: Path) -> None:
    """Optimum's main_export of the base, rewritten with every weight in one external data file.

    float16 is exported in float32 and converted with onnxruntime's float16 converter: optimum's
    own fp16 export on the CPU leaves parts of the attention in float32, which onnxruntime then
    refuses for GPT-2 and GPT-NeoX ("LayerNormalization bound to different types").
    """
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    logger.info(
        "exporting %s to ONNX (%s, %s); later compiles for this base reuse it", base.path, task, dtype
    )
    raw = into / "raw"
    kwargs = export_kwargs(base, task)  # the plain transformers export; BERT's pooler output
    if task == "text-classification":
        kwargs["pad_token_id"] = base.config.get("pad_token_id") or 0
    if task == SEQ2SEQ_TASK:
        kwargs["no_post_process"] = True  # the two decoders as separate graphs, no If subgraphs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' deprecation notes are not the user's concern here
    try:
        with warnings.catch_warnings():  # torch's tracer warns about every data-dependent branch it records
            warnings.simplefilter("ignore")
            main_export(str(base.path), raw, task=task, device="cpu", dtype="fp32", local_files_only=True,
                        do_validation=False, trust_remote_code=False, **kwargs)  # fmt: skip
    except EXPORT_FAILURES as exc:  # optimum's or torch's tracer's: the family's export is not supported
        raise export_failed("optimum's ONNX export", base, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for graph in SEQ2SEQ_GRAPHS if task == SEQ2SEQ_TASK else _PLAIN_GRAPHS:
        if dtype == "float16":
            model = _to_float16(raw / model_name(graph))
        else:
            model = onnx.load(raw / model_name(graph), load_external_data=True)
        _save(model, into, graph)
    shutil.rmtree(raw)


def _save(model: onnx.ModelProto, into: Path, graph: str = "model") -> None:
    """One graph with every weight in its one external data file."""
    onnx.save_model(model, into / model_name(graph), save_as_external_data=True, size_threshold=1024,
                    all_tensors_to_one_file=True, location=data_name(graph))  # fmt: skip


def _builder_export(base: Checkpoint, dtype: str, into: Path, provider: str, packed: bool) -> None:
    """onnxruntime-genai's builder graph of the decoder, and its genai config beside it."""
    from adaptrix.targets.onnx.builder_export import build_decoder
    from adaptrix.targets.onnx.torch_check import check_export, check_inputs, load_model

    checked = check_inputs(load_model(base, CAUSAL_TASK, None), base, CAUSAL_TASK)
    model, genai = build_decoder(base, dtype, provider, into, packed)
    _save(model, into)
    check_export(into / MODEL_NAME, checked, base, CAUSAL_TASK, BUILDER)  # it writes each family by hand
    (into / BUILDER_GENAI).write_text(json.dumps(genai, indent=2) + "\n")
    shutil.rmtree(into / "raw")
    shutil.rmtree(into / "builder-cache", ignore_errors=True)


def _torch_export(base: Checkpoint, task: str, dtype: str, into: Path) -> None:
    """torch.onnx's (TorchScript) graph of the base, float16 converted as optimum's is."""
    raw = into / "raw"
    raw.mkdir()
    torch_export(base, task, raw / MODEL_NAME)
    model = _to_float16(raw / MODEL_NAME) if dtype == "float16" else onnx.load(raw / MODEL_NAME)
    _save(model, into)
    shutil.rmtree(raw)


def _run_export(
    exporter: str, base: Checkpoint, task: str, dtype: str, into: Path, provider: str, packed: bool
) -> None:
    """The chosen exporter's export into `into` (looked up when called, so a test can replace one)."""
    if exporter == OPTIMUM:
        _export(base, task, dtype, into)
    elif exporter == BUILDER:
        _builder_export(base, dtype, into, provider, packed)
    else:
        _torch_export(base, task, dtype, into)
