"""What only some users install (the extras onnx and adapterhub): refused in one line where missing."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from test_errors import assert_refused
from typer.testing import CliRunner

from adaptrix.cli import app

PACKAGE = Path(__file__).parents[1] / "adaptrix"


def _compile(adapter: Path, base: Path, out: Path, target: str):
    args = ["compile", str(adapter), "--base", str(base), "--target", target, "-o", str(out)]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("target", ["onnx-cpu", "onnx-cuda"])
def test_seq2seq_onnx_without_optimum_names_the_extra(target, bases, peft_adapters, tmp_path, monkeypatch):
    # Decoders and encoders have exporters without optimum (test_onnx_exporters); encoder-decoders not.
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # as where it is not installed
    out = tmp_path / "out"
    line = assert_refused(_compile(peft_adapters("t5"), bases("t5"), out, target), out, "optimum-onnx")
    assert 'pip install "adaptrix[onnx]"' in line
    assert "transformers < 4.58" in line


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_optional_libraries_are_imported_only_where_they_are_needed():
    allowed = {
        "adapters": ("api/parity_run.py",),  # AdapterHub's reference forward, nothing else
        "optimum": ("targets/onnx/", "api/archs.py"),  # ONNX export; archs says what it exports
    }
    for file in PACKAGE.rglob("*.py"):
        where = file.relative_to(PACKAGE).as_posix()
        for library in _imports(ast.parse(file.read_text())) & allowed.keys():
            assert where.startswith(allowed[library]), f"{where} imports {library}"
