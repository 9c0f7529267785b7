"""The JSON files of an ONNX artifact, read strictly and checked before the session uses them.

manifest.json (its `onnx` section and the `lora` section of unmerged artifacts), config.json,
generation_config.json and genai_config.json are input like any other: a value of the wrong type,
a path out of the artifact, NaN or a nesting a parser cannot follow is one BadInputError line
naming the file, never a traceback. Standard library only (the serving-time session uses it).
"""

from __future__ import annotations

from pathlib import Path

from adaptrix.artifacts import MANIFEST_NAME, MODEL_NAME, ONNX_TARGETS
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

__all__ = [
    "MANIFEST_NAME",
    "MODEL_NAME",
    "ONNX_TARGETS",
    "check_eos",
    "file_inside",
    "read_manifest",
    "read_side_json",
]

_COMPILE_FIX = "compile one with `adaptrix compile ADAPTER --base BASE --target onnx-cpu -o OUT`"
_TAMPERED = "the artifact was edited or damaged; compile it again"
_SEQ2SEQ_TASK = "text2text-generation-with-past"  # optimum's three graphs in place of model.onnx
_SEQ2SEQ_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
_CONFIG_INTS = ("vocab_size", "max_position_embeddings", "n_positions")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(path: Path) -> dict:
    """The artifact's manifest, after checking its `onnx` section and the files that section names."""
    file = path / MANIFEST_NAME
    if not path.is_dir():
        raise BadInputError("is not a directory", path=path, fix=_COMPILE_FIX)
    if not file.is_file():
        raise BadInputError(f"no {MANIFEST_NAME}: not an adaptrix artifact", path=path, fix=_COMPILE_FIX)
    manifest = read_json(file, what="manifest")
    target = manifest.get("target") if isinstance(manifest, dict) else None
    if target not in ONNX_TARGETS or not isinstance(manifest.get("onnx"), dict):
        shown = target if isinstance(target, str | None) else type(target).__name__
        raise BadInputError(f"target {shown!r:.40} is not an ONNX target ({' or '.join(ONNX_TARGETS)})",
                            path=file, fix=_COMPILE_FIX)  # fmt: skip
    section = manifest["onnx"]
    for name in _SEQ2SEQ_FILES if section.get("task") == _SEQ2SEQ_TASK else (MODEL_NAME,):
        if not (path / name).is_file():
            raise BadInputError(f"{name} is missing", path=path, fix="compile the artifact again")
    if not isinstance(section.get("task", ""), str):
        _refuse(file, "onnx.task", f"expected a task name, found {section['task']!r:.40}")
    outputs = section.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(name, str) for name in outputs):
        _refuse(file, "onnx.outputs", f"expected the graph's output names, found {outputs!r:.60}")
    if section.get("lora") is not None:
        _check_lora(section["lora"], path, file)
    genai = section.get("genai_config")
    if genai is not None:
        file_inside(path, genai, file, "onnx.genai_config")
    read_side_json(path, "genai_config.json" if genai is None else genai)  # onnxruntime-genai's: whole
    return manifest


def _refuse(file: Path, where: str, problem: str) -> None:
    raise BadInputError(f"{where}: {problem}", path=file, fix=_TAMPERED)


def file_inside(artifact: Path, name: object, manifest: Path, where: str) -> Path:
    """A file the manifest names: a relative path that stays inside the artifact (symlinks resolved)."""
    parts = Path(name).parts if isinstance(name, str) and name and "\0" not in name else ()
    if not parts or Path(name).is_absolute() or ".." in parts:
        _refuse(manifest, where, f"expected a path inside the artifact, found {name!r:.80}")
    file = artifact / name
    try:
        inside = file.resolve().is_relative_to(artifact.resolve())
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name the OS refuses
        raise BadInputError(f"cannot be resolved ({exc})", path=file, fix=_TAMPERED) from None
    if not inside:
        _refuse(manifest, where, f"{name} resolves outside the artifact")
    return file


def _check_lora(lora: object, artifact: Path, file: Path) -> None:
    """An unmerged artifact's `lora` section: model version, adapter inputs and adapter files."""
    if not isinstance(lora, dict):
        _refuse(file, "onnx.lora", f"expected an object, found {type(lora).__name__}")
    if not _is_int(lora.get("model_version")):
        _refuse(
            file, "onnx.lora.model_version", f"expected an integer, found {lora.get('model_version')!r:.40}"
        )
    inputs = lora.get("inputs")
    if not isinstance(inputs, dict):
        _refuse(file, "onnx.lora.inputs", f"expected an object of adapter inputs, found {inputs!r:.60}")
    for name, spec in inputs.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(d == "rank" or (_is_int(d) and d > 0) for d in shape):
            _refuse(file, f"onnx.lora.inputs.{name}.shape", f"expected sizes or 'rank', found {shape!r:.60}")
    adapters = lora.get("adapters", {})
    if not isinstance(adapters, dict):
        _refuse(file, "onnx.lora.adapters", f"expected an object of adapters, found {adapters!r:.60}")
    for name, entry in adapters.items():
        where = f"onnx.lora.adapters.{name}"
        if not isinstance(entry, dict):
            _refuse(file, where, f"expected an object, found {entry!r:.60}")
        file_inside(artifact, entry.get("file"), file, f"{where}.file")


def read_side_json(artifact: Path, name: str) -> dict:
    """A JSON object file of the artifact (config.json ...), strictly read; {} when absent."""
    file = artifact / name
    if not file.exists():
        return {}
    value = read_json(file, what=name)
    if not isinstance(value, dict):
        raise BadInputError(f"expected a JSON object, found {type(value).__name__}", path=file, fix=_TAMPERED)
    if name == "config.json":
        for key in _CONFIG_INTS:
            if value.get(key) is not None and (not _is_int(value[key]) or value[key] <= 0):
                _refuse(file, key, f"expected a positive integer, found {value[key]!r:.40}")
    if "eos_token_id" in value:
        check_eos(value["eos_token_id"], file)
    return value


def check_eos(eos: object, file: Path) -> None:
    """An eos_token_id: absent (None), a token id, or a list of token ids."""
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not all(_is_int(token) and token >= 0 for token in ids):
        _refuse(file, "eos_token_id", f"expected a token id or a list of them, found {eos!r:.40}")
