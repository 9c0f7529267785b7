"""The base model exported to ONNX once, with optimum, and cached by what it was built from.

The cache key is the sha256 of the base's weight and config files, the ONNX dtype, the export
task and the versions of the exporting libraries. A cached export holds `model.onnx` with every
weight in `model.onnx_data`, unquantized; each compile for the same base patches a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import onnx

from adaptrix.artifacts import DATA_NAME, MANIFEST_NAME, MODEL_NAME
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hashing import hash_files
from adaptrix.io.output import atomic_entry
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.targets.onnx.export_outputs import export_kwargs
from adaptrix.targets.onnx.float16 import to_float16

__all__ = ["DATA_NAME", "EXPORT_FORMAT", "MODEL_NAME", "BaseExport", "cache_root", "export_base", "task_of"]

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 4  # bump when the cached layout or the graph rewrites change
_DTYPES = ("float32", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".json")


@dataclass(frozen=True, slots=True)
class BaseExport:
    """A cached, unquantized export of one base: graph, weights and what it was built from."""

    path: Path
    key: str
    task: str
    dtype: str

    @property
    def model(self) -> Path:
        """The cached graph."""
        return self.path / MODEL_NAME

    @property
    def data(self) -> Path:
        """The cached graph's weights."""
        return self.path / DATA_NAME


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Where exports are cached: `cache_dir`, else $ADAPTRIX_CACHE_DIR, else the XDG cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ADAPTRIX_CACHE_DIR"):
        return Path(os.environ["ADAPTRIX_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "adaptrix" / "onnx"


def task_of(base: Checkpoint) -> str:
    """Optimum's export task for the base's architecture (decoders keep their KV cache)."""
    architectures = [str(a) for a in base.config.get("architectures") or []]
    for arch in architectures:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation-with-past"
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch in ("BertModel", "RobertaModel"):
            return "feature-extraction"
    raise UnsupportedError(
        f"architectures {architectures} have no ONNX export task here",
        path=base.path / "config.json",
        fix="use a *ForCausalLM, *ForSequenceClassification or BertModel/RobertaModel base",
    )


def export_key(base: Checkpoint, dtype: str, task: str) -> str:
    """The cache key: the base's files, the dtype, the task and the exporters' versions."""
    files = [f for f in base.files() if f.name.endswith(_WEIGHT_SUFFIXES) and f.name != MANIFEST_NAME]
    digests = hash_files(files)
    parts = {
        "format": EXPORT_FORMAT,
        "files": {f.name: digests[f] for f in files},
        "dtype": dtype,
        "task": task,
        "versions": {p: version(p) for p in ("torch", "transformers", "optimum-onnx", "onnx")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def export_base(base: Checkpoint, dtype: str, cache_dir: Path | str | None = None) -> BaseExport:
    """The cached export of `base` in `dtype` (float32 or float16), exporting it on first use."""
    if dtype not in _DTYPES:
        raise UnsupportedError(
            f"ONNX targets emit float32 or float16, not {dtype}",
            fix="pass --dtype fp32 or --dtype fp16",
        )
    task = task_of(base)
    key = export_key(base, dtype, task)
    root = cache_root(cache_dir)
    entry = root / key[:32]
    if (entry / MODEL_NAME).is_file() and (entry / "export.json").is_file():
        logger.info("using the cached ONNX export %s", entry)
        return BaseExport(entry, key, task, dtype)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the cache directory: {exc.strerror}", path=root,
                            fix="pass --cache-dir with a writable directory") from None  # fmt: skip
    if os.path.lexists(entry):
        raise _in_the_way(entry)
    with atomic_entry(entry) as tmp:  # a killed export leaves nothing: its watcher, or the next export
        _export(base, task, dtype, tmp)
        (tmp / "export.json").write_text(json.dumps({"key": key, "task": task, "dtype": dtype,
                                                     "base": str(base.path)}, indent=2) + "\n")  # fmt: skip
    if not (entry / "export.json").is_file():
        raise _in_the_way(entry)
    return BaseExport(entry, key, task, dtype)


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
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' deprecation notes are not the user's concern here
    try:
        with warnings.catch_warnings():  # torch's tracer warns about every data-dependent branch it records
            warnings.simplefilter("ignore")
            main_export(str(base.path), raw, task=task, device="cpu", dtype="fp32", local_files_only=True,
                        do_validation=False, trust_remote_code=False, **kwargs)  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
    if dtype == "float16":
        model = _to_float16(raw / MODEL_NAME)
    else:
        model = onnx.load(raw / MODEL_NAME, load_external_data=True)
    onnx.save_model(model, into / MODEL_NAME, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)  # fmt: skip
    shutil.rmtree(raw)
