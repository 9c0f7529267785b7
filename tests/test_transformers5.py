"""What transformers 5 loads under another name than its checkpoints keep: handled on 4.57 and 5 alike."""

from __future__ import annotations

import shutil

import pytest
from builders import load_model, make_adapter
from safetensors.torch import load_file, save_file

from adaptrix import compile_adapter
from adaptrix.artifacts import find_module
from adaptrix.ir.errors import BadInputError


def test_neox_head_is_found_by_its_checkpoint_name(bases):
    model = load_model("gpt_neox", bases("gpt_neox"))
    head = model.get_output_embeddings()  # `embed_out` to transformers 4, `lm_head` to transformers 5
    assert find_module(model, "embed_out") is head


def test_an_untied_neox_base_without_its_head_is_still_refused(bases, tmp_path):
    base = shutil.copytree(bases("gpt_neox"), tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    del weights["embed_out.weight"]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter("gpt_neox", bases("gpt_neox"), tmp_path / "adapter")
    with pytest.raises(BadInputError, match=r"with a embed_out, but the weights hold no embed_out\.weight"):
        compile_adapter(adapter, base, "merged", tmp_path / "out")
