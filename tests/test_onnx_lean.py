"""onnx-cpu decoders as lean as onnxruntime-genai's builder: fused norms, packed q/k/v, no Constants.

Each test compares against PEFT (or the float32 graph, for int4) and counts what the graph runs:
the builder's int4 graph of a Llama has one (Skip)SimplifiedLayerNormalization per norm and one
q/k/v MatMulNBits per layer; Adaptrix's also keeps a Split and RotaryEmbedding nodes (pack.py says
why).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from builders import load_model, sample_inputs
from onnx_builders import assert_each_file_matches_peft, compile_unmerged
from peft import PeftModel
from test_onnx_parity import (
    ONNX_FP32_TOLERANCE,
    assert_matches,
    base_logits,
    genai_tokens,
    max_diff,
    peft_tokens,
    positions_of,
    prefill,
    seeded_adapter,
    session,
    step,
)
from test_onnx_unmerged import QUANTIZED_TOLERANCE, relative_error

from adaptrix.api.compile import compile_adapter
from adaptrix.runtimes.onnx.session import open_onnx

pytestmark = pytest.mark.onnx_export

LAYERS = 2
HEAD16 = {"hidden_size": 64}  # 4 heads of 16, 2 kv heads
# Per layer: packed q/k/v, o, gate, up, down; and the head (the builder's int4 graph has the same).
MATMULS = 5 * LAYERS + 1


@pytest.fixture(scope="module")
def head16(bases, tmp_path_factory):
    """(base, adapter, fp32 output) of a llama with head size 16, the adapter on every projection."""
    root = tmp_path_factory.mktemp("lean")
    base = bases("llama", "head16", **HEAD16)
    adapter = seeded_adapter("llama", base, root / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", root / "fp32")
    return base, adapter, root / "fp32"


def ops(out: Path) -> Counter:
    return Counter(
        node.op_type for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node
    )


def graph_section(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["onnx"]["graph"]


def node_names(out: Path) -> list[str]:
    return [node.name for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node]


def test_fp32_graph_has_fused_norms_packed_qkv_and_no_constants(head16):
    _, _, out = head16
    found = ops(out)
    assert found["SimplifiedLayerNormalization"] + found["SkipSimplifiedLayerNormalization"] == 2 * LAYERS + 1
    assert found["SkipSimplifiedLayerNormalization"] == 2 * LAYERS  # every norm after the first takes its Add
    for op in ("Pow", "ReduceMean", "Sqrt", "Div", "Constant", "Identity", "ConstantOfShape", "Reshape"):
        assert found[op] == 0, op  # the last two: optimum's mask, now 12 nodes (mask.py)
    assert sum(found.values()) == 11 * LAYERS + 22  # per layer 11, then the mask, embedding, head
    # the packed q/k/v goes into the attention, which rotates q and k itself (attention_rotary.py)
    assert found["MatMul"] == MATMULS and found["GroupQueryAttention"] == LAYERS
    assert found["Split"] == found["RotaryEmbedding"] == 0
    names = node_names(out)
    for layer in range(LAYERS):
        assert f"/model/layers.{layer}/self_attn/qkv_proj/MatMul" in names
        assert f"/model/layers.{layer}/self_attn/q_proj/MatMul" not in names
    section = graph_section(out)
    assert section["norms"] == {"fused": 2 * LAYERS + 1, "skip": 2 * LAYERS, "declined": None}
    assert section["qkv"] == {"packed_layers": LAYERS, "declined": {}}
    assert section["mask"] == {"replaced": True, "declined": None}


def test_fp32_lean_graph_matches_peft_prefill_and_left_padded_decode(head16):
    """A left-padded row of a batch gets PEFT's logits, in the prefill and in a decode step."""
    base, adapter, out = head16
    inputs = sample_inputs("llama")
    expected = PeftModel.from_pretrained(load_model("llama", base), adapter).eval()
    with torch.no_grad():
        assert_matches(prefill(session(out), inputs), expected(**inputs).logits,
                       base_logits("llama", base, inputs), ONNX_FP32_TOLERANCE)  # fmt: skip
        ids = inputs["input_ids"]
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        positions = positions_of(mask)
        want = expected(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    sess = session(out)
    first = step(sess, ids[:, :-1], mask[:, :-1], positions[:, :-1])
    valid = mask[:, :-1].bool()
    assert max_diff(torch.from_numpy(first["logits"])[valid], want[:, :-1][valid]) <= ONNX_FP32_TOLERANCE
    last = step(sess, ids[:, -1:], mask, positions[:, -1:], past=first)
    assert max_diff(torch.from_numpy(last["logits"])[:, -1], want[:, -1]) <= ONNX_FP32_TOLERANCE


def test_int4_graph_runs_one_matmulnbits_for_qkv_and_stays_near_float32(head16, tmp_path):
    base, adapter, fp32 = head16
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "int4", quantize="int4")
    found = ops(tmp_path / "int4")
    assert found["MatMulNBits"] == MATMULS and found["MatMul"] == 0 and found["Pow"] == 0
    assert found["Constant"] == found["Identity"] == 0
    graph = onnx.load(tmp_path / "int4" / "model.onnx", load_external_data=False).graph
    qkv = next(n for n in graph.node if n.name.startswith("/model/layers.0/self_attn/qkv_proj/MatMul"))
    attrs = {a.name: a.i for a in qkv.attribute}
    assert attrs["N"] == 64 + 2 * 2 * 16 and attrs["K"] == 64  # q (4 heads) + k, v (2 kv heads) of 16
    inputs = sample_inputs("llama")
    reference = prefill(session(fp32), inputs)
    error = relative_error(prefill(session(tmp_path / "int4"), inputs), reference)
    assert error <= QUANTIZED_TOLERANCE["int4"], error
    assert error <= 0.25 * relative_error(base_logits("llama", base, inputs), reference)  # the adapter shows


def test_unmerged_graph_packs_the_base_projections_and_each_file_matches_peft(head16, tmp_path):
    """The LoRA branches add to each projection's slice of the packed MatMul's output."""
    base, adapter, _ = head16
    case = compile_unmerged("llama", base, {"adapter": adapter}, tmp_path / "out")
    found = ops(case.out)
    assert found["Split"] == LAYERS and found["Pow"] == 0 and found["Constant"] == 0
    section = graph_section(case.out)
    assert section["qkv"]["packed_layers"] == LAYERS
    assert_each_file_matches_peft(case)


def test_a_graph_without_the_patterns_is_left_as_exported_and_the_report_says_why(bases, tmp_path):
    base = bases("gpt2", "in-vocab-special-tokens", bos_token_id=1, eos_token_id=2)
    adapter = seeded_adapter("gpt2", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out")
    found = ops(tmp_path / "out")
    assert found["LayerNormalization"] == 2 * LAYERS + 1 and found["SimplifiedLayerNormalization"] == 0
    section = graph_section(tmp_path / "out")
    assert section["norms"]["fused"] == 0 and "RMSNorm" in section["norms"]["declined"]
    assert section["qkv"]["packed_layers"] == 0 and "q_proj" in section["qkv"]["declined"]["graph"]
    inputs = sample_inputs("gpt2")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model("gpt2", base), adapter).eval()(**inputs).logits
    assert max_diff(prefill(session(tmp_path / "out"), inputs), expected) <= ONNX_FP32_TOLERANCE


def test_heads_of_eight_keep_their_rotary_nodes_and_the_report_says_why(bases, tmp_path):
    """GroupQueryAttention's own rotary takes head sizes that are multiples of 16 only."""
    base = bases("llama")  # head size 8
    adapter = seeded_adapter("llama", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out")
    found = ops(tmp_path / "out")
    assert found["RotaryEmbedding"] == 2 * LAYERS and found["Split"] == LAYERS
    report = graph_section(tmp_path / "out")["rotary_in_attention"]
    assert report["fused"] == 0 and all("multiple of 16" in why for why in report["declined"].values())
    assert graph_section(tmp_path / "out")["dropped_inputs"] == []  # the rotary nodes read position_ids
    assert "position_ids" in open_onnx(tmp_path / "out").inputs
    # GroupQueryAttention alone reads the past (the rotary nodes sit before it): one shared buffer
    genai = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    inputs = sample_inputs("llama")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model("llama", base), adapter).eval()(**inputs).logits
    assert max_diff(prefill(session(tmp_path / "out"), inputs), expected) <= ONNX_FP32_TOLERANCE


def test_head16_report_counts_every_layer_rotating_inside_the_attention(head16):
    assert graph_section(head16[2])["rotary_in_attention"] == {"fused": LAYERS, "declined": {}}


def test_position_ids_leave_the_graph_once_nothing_reads_them_and_the_runtime_still_takes_padding(head16):
    """Every layer rotates inside the attention: position_ids is dropped, padding masked by the bias."""
    base, adapter, out = head16
    assert graph_section(out)["dropped_inputs"] == ["position_ids"]
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert "position_ids" not in {value.name for value in graph.input}
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["inputs"]
    assert "position_ids" not in genai and genai["attention_mask"] == "attention_mask"
    ids = sample_inputs("llama")["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_model("llama", base), adapter).eval()
        want = peft(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    got = torch.from_numpy(open_onnx(out).logits(ids.numpy(), mask.numpy()))
    valid = mask.bool()
    assert max_diff(got[valid], want[valid]) <= ONNX_FP32_TOLERANCE


def test_genai_shares_the_kv_buffer_of_a_lean_graph_and_generates_peft_tokens(head16):
    """Every past key / value is GroupQueryAttention's alone: one buffer, appended in place."""
    pytest.importorskip("onnxruntime_genai")
    base, adapter, out = head16
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    prompt = tuple(sample_inputs("llama", batch=1)["input_ids"][0].tolist())
    assert genai_tokens(out, prompt) == peft_tokens("llama", base, adapter, prompt)
