"""Find an `.onnx_adapter` file for an unmerged ONNX artifact and check it fits, before onnxruntime loads it.

onnxruntime loads any adapter file and fails (or computes garbage) only when it runs; here every
parameter is checked first against the manifest's `lora` section and the graph's adapter inputs:
the model version (which base export it was compiled for), the names, the dtype, A [in, rank] and
B [rank, out] with one rank per pair, both halves of each pair, and IA3's vectors
(`<module>.ia3_out` [out], `.ia3_in` [in]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.onnx.files import MANIFEST_NAME, file_inside

__all__ = ["adapter_file", "adapter_problems", "check_adapter_file", "dtype_name", "read_adapter"]

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(bfloat16)": "bfloat16"}  # fmt: skip
_HALVES = (".lora_A", ".lora_B")
_NUMPY_FLOATS = ("float32", "float16", "float64")


def dtype_name(ort_type: str) -> str:
    """The numpy name of an onnxruntime type string: `tensor(float)` -> float32."""
    return _DTYPES.get(ort_type, ort_type)


def adapter_file(artifact: Path, lora: dict | None, name_or_path: str | Path) -> Path:
    """The file of an adapter compiled with the artifact (by name), or any existing file (by path)."""
    if lora is None:
        raise BadInputError(
            "was compiled merged: it has no LoRA inputs, so it takes no adapter",
            path=artifact,
            fix="compile with --unmerged to ship swappable adapters",
        )
    entries = lora.get("adapters", {})
    if str(name_or_path) in entries:
        where = f"onnx.lora.adapters.{name_or_path}.file"
        return file_inside(artifact, entries[str(name_or_path)]["file"], artifact / MANIFEST_NAME, where)
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    raise BadInputError(
        f"no adapter named {str(name_or_path)!r} and no such file",
        path=artifact,
        fix=f"name one of {sorted(entries)} or pass an .onnx_adapter file",
    )


def read_adapter(file: Path) -> ort.AdapterFormat:
    """An `.onnx_adapter` file read by onnxruntime, with its parameters' names checked as text."""
    if not file.is_file():
        raise BadInputError("is not a file", path=file, fix="pass an .onnx_adapter file")
    try:
        adapter = ort.AdapterFormat.read_adapter(str(file))
        adapter.get_parameters()  # names are decoded here: bytes that are not UTF-8 raise
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or ["unreadable"])[-1]
        raise BadInputError(f"cannot be read as an .onnx_adapter file: {reason}", path=file) from None
    except UnicodeDecodeError:
        problem = "holds a parameter name that is not UTF-8 text: the file is damaged or was tampered with"
        raise BadInputError(problem, path=file, fix="compile the adapter again") from None
    return adapter


def check_adapter_file(file: Path, lora: dict, dtypes: dict[str, str]) -> None:
    """Raise one BadInputError line naming `file` when it does not fit the LoRA inputs.

    `lora` is the manifest's section; `dtypes` maps each LoRA input to its dtype in the graph.
    """
    adapter = read_adapter(file)
    if adapter.get_model_version() != lora["model_version"]:
        raise BadInputError(
            f"was compiled for another base (model version {adapter.get_model_version()}, "
            f"this artifact's is {lora['model_version']})",
            path=file,
            fix="use an adapter compiled with this artifact, or compile it for this base with --unmerged",
        )
    params = adapter.get_parameters()
    problems = adapter_problems(params, lora["inputs"], dtypes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BadInputError(problems[0] + more, path=file)
    for name, value in sorted(params.items()):
        if dtype_name(value.data_type()) in _NUMPY_FLOATS and not np.isfinite(value.numpy()).all():
            raise BadInputError(
                f"parameter {name} holds NaN or Inf", path=file, fix="compile the adapter again"
            )


def adapter_problems(params: dict[str, ort.OrtValue], inputs: dict, dtypes: dict[str, str]) -> list[str]:
    """Every way the parameters misfit the adapter inputs, as `parameter X: expected ..., found ...`."""
    if not params:
        return ["holds no parameters: expected LoRA pairs or IA3 vectors, found none"]
    problems, ranks = [], {}
    for name, value in sorted(params.items()):
        if name not in inputs:
            problems.append(f"parameter {name}: expected one of the artifact's {len(inputs)} adapter "
                            "inputs (<module>.lora_A / .lora_B / .ia3_out / .ia3_in), found a name it "
                            "does not have")  # fmt: skip
            continue
        dtype = dtype_name(value.data_type())
        if dtype != dtypes[name]:
            problems.append(f"parameter {name}: expected {dtypes[name]}, found {dtype}")
        shape, expected = list(value.shape()), inputs[name]["shape"]
        fits = len(shape) == len(expected) and all(
            e == "rank" or e == s for e, s in zip(expected, shape, strict=True)
        )
        if not fits:
            problems.append(f"parameter {name}: expected shape {_shape(expected)}, found {_shape(shape)}")
        elif name.endswith(_HALVES):
            ranks[name] = shape[1] if name.endswith(".lora_A") else shape[0]
    problems += _pair_problems(params, inputs, ranks)
    return problems


def _pair_problems(params: dict, inputs: dict, ranks: dict[str, int]) -> list[str]:
    problems = []
    for name in sorted(n for n in params if n in inputs and n.endswith(_HALVES)):
        stem, half = name[: -len(".lora_A")], name[-len(".lora_A") :]
        other = stem + (_HALVES[1] if half == _HALVES[0] else _HALVES[0])
        if other not in params:
            problems.append(f"parameter {other}: expected beside {name}, found missing")
        elif half == _HALVES[0] and name in ranks and other in ranks and ranks[name] != ranks[other]:
            problems.append(f"parameters {name} and {other}: expected one rank, "
                            f"found {ranks[name]} and {ranks[other]}")  # fmt: skip
    return problems


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
