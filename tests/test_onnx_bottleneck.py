"""AdapterHub bottlenecks in onnx-cpu / onnx-cuda graphs compute what AdapterHub's own forward does.

Adapters are made with AdapterHub on the tiny Llama and on a tiny BertModel (feature extraction:
the graph outputs the last hidden state, which shows an adapter better than the tiny classifier).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import load_model, sample_inputs
from hub_builders import (
    ConfigUnion,
    DoubleSeqBnConfig,
    LoRAConfig,
    ParBnConfig,
    SeqBnConfig,
    hub_model,
    save_hub,
    share_layer_weights,
)
from onnx import TensorProto, helper
from test_onnx_parity import (
    FP16_TOLERANCE,
    ONNX_FP32_TOLERANCE,
    assert_matches,
    float_types,
    max_diff,
    prefill,
    session,
    step,
)
from transformers import AutoModel

from adaptrix.api.compile import compile_adapter, load
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.runtimes.hooks.activations import ACTIVATIONS
from adaptrix.targets.onnx.bottleneck import insert_bottlenecks, split_bottlenecks
from adaptrix.targets.onnx.bottleneck_ops import ONNX_ACTIVATIONS, NodeWriter
from adaptrix.targets.onnx.export import export_base

pytestmark = pytest.mark.onnx_export

LLAMA_KINDS = {
    "seqbn": SeqBnConfig(reduction_factor=4),
    "doubleseqbn": DoubleSeqBnConfig(reduction_factor=4),
    "parbn": ParBnConfig(reduction_factor=4),
}
BERT_KINDS = {
    "lora+seqbn": ConfigUnion(
        LoRAConfig(r=4, alpha=8, intermediate_lora=True, output_lora=True), SeqBnConfig(reduction_factor=4)
    ),
    # The layer's own LayerNorm before and after the adapter, the adapter's own norms, gelu (erf).
    "norms": SeqBnConfig(reduction_factor=4, original_ln_before=True, residual_before_ln="post_add",
                         ln_before=True, ln_after=True, non_linearity="gelu"),
}  # fmt: skip


@torch.no_grad()
def llama_base_logits(base: Path) -> torch.Tensor:
    return load_model("llama", base)(**sample_inputs("llama")).logits


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("kind", sorted(LLAMA_KINDS))
def test_llama_bottleneck_matches_adapterhub(kind, bases, tmp_path):
    base = bases("llama")
    adapter, expected = save_hub("llama", base, LLAMA_KINDS[kind], tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out")
    sess = session(tmp_path / "out")
    got = prefill(sess, sample_inputs("llama"))
    assert got.dtype == torch.float32
    assert_matches(got, expected, llama_base_logits(base), ONNX_FP32_TOLERANCE)
    section = manifest_of(tmp_path / "out")["onnx"]
    blocks = {"seqbn": {"mlp"}, "doubleseqbn": {"attn", "mlp"}, "parbn": {"mlp"}}[kind]
    assert {entry["block"] for entry in section["bottlenecks"]["sites"]} == blocks
    assert len(section["bottlenecks"]["sites"]) == 2 * len(blocks)
    assert all(entry["size"] == 8 for entry in section["bottlenecks"]["sites"])
    assert section["attention"]["fused_layers"] == 2  # the bottlenecks do not stop the fusion
    if kind == "doubleseqbn":  # prefill all but the last token, then one step with the KV cache
        ids = sample_inputs("llama")["input_ids"]
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids)
        first = step(sess, ids[:, :-1], mask[:, :-1], positions[:, :-1])
        assert max_diff(torch.from_numpy(first["logits"]), expected[:, :-1]) <= ONNX_FP32_TOLERANCE
        last = step(sess, ids[:, -1:], mask, positions[:, -1:], past=first)
        assert max_diff(torch.from_numpy(last["logits"])[:, -1], expected[:, -1]) <= ONNX_FP32_TOLERANCE


@pytest.fixture(scope="module")
def bert_model_base(bases, tmp_path_factory) -> Path:
    """The tiny BERT's encoder saved as a BertModel (exported for feature extraction)."""
    path = tmp_path_factory.mktemp("bert-model")
    load_model("bert", bases("bert")).bert.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", sorted(BERT_KINDS))
def test_bert_bottleneck_matches_adapterhub(kind, bert_model_base, tmp_path):
    base = bert_model_base
    model = hub_model(None, base, BERT_KINDS[kind], model=AutoModel.from_pretrained(base).eval())
    model.save_adapter(str(tmp_path / "adapter"), "hub")
    inputs = sample_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        plain = AutoModel.from_pretrained(base).eval()(**inputs).last_hidden_state
    compile_adapter(tmp_path / "adapter", base, "onnx-cpu", tmp_path / "out")
    sess = session(tmp_path / "out")
    feeds = {value.name: inputs[value.name].numpy() for value in sess.get_inputs()}
    got = torch.from_numpy(sess.run(["last_hidden_state"], feeds)[0])
    assert_matches(got, expected, plain, ONNX_FP32_TOLERANCE)
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    # Per layer: attention's, the FFN's before and after the adapter (reused), the adapter's own.
    per_layer = {"lora+seqbn": 1 + 2, "norms": 1 + 2 + 2}[kind]
    assert ops.count("LayerNormalization") == 1 + 2 * per_layer  # + the embeddings'


def test_onnx_cuda_float16_bottleneck_on_the_cpu_provider(bases, tmp_path):
    base = bases("llama")
    adapter, expected = save_hub("llama", base, LLAMA_KINDS["doubleseqbn"], tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cuda", tmp_path / "out")
    assert manifest_of(tmp_path / "out")["dtype"] == "float16"
    assert float_types(tmp_path / "out") == {"FLOAT16"}
    got = prefill(session(tmp_path / "out"), sample_inputs("llama"))
    assert got.dtype == torch.float16
    assert_matches(got, expected, llama_base_logits(base), FP16_TOLERANCE)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        sess = session(tmp_path / "out", providers=("CUDAExecutionProvider",))
        got = prefill(sess, sample_inputs("llama"))
        assert_matches(got, expected, llama_base_logits(base), FP16_TOLERANCE)


def test_shared_bottleneck_is_one_initializer(bases, tmp_path):
    base = bases("llama")
    adapter, expected = save_hub("llama", base, LLAMA_KINDS["seqbn"], tmp_path / "adapter",
                                 edit=share_layer_weights)  # fmt: skip
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out")
    assert_matches(prefill(session(tmp_path / "out"), sample_inputs("llama")), expected,
                   llama_base_logits(base), ONNX_FP32_TOLERANCE)  # fmt: skip
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    stored = sorted(init.name for init in graph.initializer if ".bottleneck." in init.name)
    prefix = "model.layers.0.mlp.bottleneck."
    assert stored == [prefix + name for name in ("down", "down_bias", "up", "up_bias")]
    readers = [name for node in graph.node for name in node.input if name == prefix + "down"]
    assert len(readers) == 2  # both layers' MatMuls read the one initializer
    section = manifest_of(tmp_path / "out")["onnx"]["bottlenecks"]
    assert section["initializers"] == 4 and section["sites"][1]["shared"] == "layer 0 mlp"


def test_graph_without_the_residual_add_names_the_layer_and_block(bases, tmp_path):
    """A block output read by anything but one residual Add is an error, never a silent skip."""
    base = bases("llama")
    adapter, _ = save_hub("llama", base, LLAMA_KINDS["seqbn"], tmp_path / "adapter")
    checkpoint = Checkpoint(base)
    _, ops = split_bottlenecks(load(adapter, checkpoint))
    model = onnx.load(export_base(checkpoint, "float32").model, load_external_data=False)
    down_proj = "/model/layers.1/mlp/down_proj/MatMul"
    h = next(node.output[0] for node in model.graph.node if node.name == down_proj)
    model.graph.node.append(helper.make_node("Identity", [h], ["extra"], name="extra"))
    with pytest.raises(UnsupportedError, match="layer 1 mlp: the block's output h"):
        insert_bottlenecks(model, checkpoint, ops)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_every_activation_has_an_onnx_form_matching_torch(dtype):
    assert set(ONNX_ACTIVATIONS) == set(ACTIVATIONS)
    x = torch.linspace(-8, 8, 801)
    graph = helper.make_graph([], "activations", [helper.make_tensor_value_info("x", dtype, [801])], [])
    writer = NodeWriter(graph, "act", dtype, {})
    names = {}
    for name, emit in ONNX_ACTIVATIONS.items():
        out = emit(writer, "x")
        names[name] = out if out != "x" else writer("Identity", "x")
    graph.node.extend(writer.nodes)
    graph.output.extend(helper.make_tensor_value_info(out, dtype, [801]) for out in names.values())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    np_dtype = np.float32 if dtype == TensorProto.FLOAT else np.float16
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(names, sess.run(list(names.values()), {"x": x.numpy().astype(np_dtype)}), strict=True))
    tolerance = 1e-6 if dtype == TensorProto.FLOAT else 2e-2
    for name, fn in ACTIVATIONS.items():
        expected = fn(x)
        diff = float((torch.from_numpy(got[name]).float() - expected).abs().max())
        assert diff <= tolerance * max(1.0, math.ceil(float(expected.abs().max()))), (name, diff)
