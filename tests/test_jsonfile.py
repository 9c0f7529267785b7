"""Strict JSON: every number finite, nesting and size bounded, each refusal one line naming the file."""

from __future__ import annotations

import pytest

from adaptrix.io.jsonfile import MAX_DEPTH, loads_strict, read_json
from adaptrix.ir.errors import BadInputError


@pytest.mark.parametrize(
    "text",
    ['{"lora_alpha": NaN}', '{"r": Infinity}', "[-Infinity]", '{"lora_alpha": 1e400}',
     "[" * 100_000 + "]" * 100_000,
     "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "9" * 5000, "{", b"\xff\xfe\x00"],
)  # fmt: skip
def test_hostile_json_is_refused_in_one_line(text):
    with pytest.raises(BadInputError) as caught:
        loads_strict(text, path="cfg.json")
    line = caught.value.line()
    assert line.startswith("cfg.json: is not valid JSON") and "\n" not in line


def test_ordinary_json_is_read_as_python_reads_it():
    text = '{"r": 8, "lora_alpha": 16.5, "target_modules": ["q_proj"], "nested": [[[1e300]]], "none": null}'
    assert loads_strict(text) == {"r": 8, "lora_alpha": 16.5, "target_modules": ["q_proj"],
                                  "nested": [[[1e300]]], "none": None}  # fmt: skip
    assert loads_strict("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None


def test_files_too_large_or_unreadable_are_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(BadInputError, match="larger than 1000 bytes"):
        read_json(big, max_bytes=1000)
    with pytest.raises(BadInputError, match="is a directory"):
        read_json(tmp_path)
    with pytest.raises(BadInputError, match="cannot be read"):
        read_json(tmp_path / "missing.json")
    assert len(read_json(big)) == 601
