"""onnx-cuda's float16 graphs keep in float32 what the model computes in float32.

Each RMSNorm becomes one SimplifiedLayerNormalization that computes in float32 with the model's
own epsilon (onnxruntime 1.31, today's onnxruntime-gpu, fuses the float16 pattern itself with
1e-5 for a float16 1e-6: 9e-3 off PEFT's logits); the rotary tables stay float32 (in float16 the
cosines are 0.96 off by position 4000).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from test_onnx_parity import onnx_base, seeded_adapter

from adaptrix.api.compile import compile_adapter
from adaptrix.targets.onnx.float16 import fuse_rms_norms

pytestmark = pytest.mark.onnx_export

RMS_FAMILIES = ("llama", "qwen2", "phi3")


@pytest.fixture(scope="module")
def fp16_outputs(bases, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"fp16-{family}")
            base = onnx_base(bases, family)
            adapter = seeded_adapter(family, base, root / "adapter")
            compile_adapter(adapter, base, "onnx-cuda", root / "out")
            made[family] = (base, root / "out")
        return made[family]

    return get


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_each_rms_norm_is_one_float32_node_with_the_models_epsilon(family, fp16_outputs):
    base, out = fp16_outputs(family)
    config = json.loads((base / "config.json").read_text())
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    norms = [node for node in graph.node if node.op_type == "SimplifiedLayerNormalization"]
    assert len(norms) == 2 * config["num_hidden_layers"] + 1
    for node in norms:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["stash_type"] == 1 and attrs["axis"] == -1
        assert attrs["epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert not any(node.op_type in ("Pow", "ReduceMean") for node in graph.node)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gpt_neox"])
def test_rotary_tables_are_float32_at_long_positions(family, fp16_outputs):
    """The cosines the graph computes, read at 4096 positions, against float64 ones."""
    base, out = fp16_outputs(family)
    config = json.loads((base / "config.json").read_text())
    model = onnx.load(out / "model.onnx", load_external_data=False)
    cos = next(node for node in model.graph.node if node.op_type == "Cos")
    model.graph.output.append(helper.make_empty_tensor_value_info(cos.output[0]))
    onnx.save(model, out / "probe.onnx")  # beside model.onnx_data, which it reads
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(out / "probe.onnx"), options, providers=["CPUExecutionProvider"])
    length = 4096
    feeds = {
        "input_ids": np.full((1, length), 5, np.int64),
        "attention_mask": np.ones((1, length), np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None],
    }
    for value in sess.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), np.float16)
    got = sess.run([cos.output[0]], feeds)[0].astype(np.float64).reshape(length, -1)
    (out / "probe.onnx").unlink()
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dim = int(head * config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
    theta = config.get("rope_theta", config.get("rotary_emb_base", 10000.0))
    inverse = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(length)[:, None] * inverse[None]
    expected = np.cos(np.concatenate([angles, angles], axis=-1))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_an_rms_norm_whose_variance_is_read_elsewhere_is_left_alone():
    """Only the plain pattern is replaced: an intermediate value with another reader stays."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], name="up", to=onnx.TensorProto.FLOAT),
        helper.make_node("Pow", ["xf", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="mean", keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["vare"], name="add"),
        helper.make_node("Sqrt", ["vare"], ["std"], name="sqrt"),
        helper.make_node("Div", ["one", "std"], ["inv"], name="div"),
        helper.make_node("Mul", ["xf", "inv"], ["normed"], name="scaled"),
        helper.make_node("Cast", ["normed"], ["back"], name="back", to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["w", "back"], ["y"], name="weight"),
    ]
    init = [
        onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        onnx.numpy_helper.from_array(np.ones(4, np.float32), "w"),
    ]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    var = helper.make_tensor_value_info("var", onnx.TensorProto.FLOAT, [2, 1])
    plain = helper.make_graph(nodes, "g", [x], [y], init)
    assert fuse_rms_norms(plain) == 1
    assert [node.op_type for node in plain.node] == ["SimplifiedLayerNormalization"]
    assert list(plain.node[0].input) == ["x", "w"] and list(plain.node[0].output) == ["y"]
    shared = helper.make_graph(nodes, "g", [x], [y, var], init)
    assert fuse_rms_norms(shared) == 0 and len(shared.node) == len(nodes)
    unnamed = helper.make_graph(nodes, "g", [x], [y], init)
    for node in unnamed.node:
        node.name = ""  # nodes are replaced by name: without names, nothing is
    assert fuse_rms_norms(unnamed) == 0 and len(unnamed.node) == len(nodes)
