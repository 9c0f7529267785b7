"""onnx-cpu --unmerged with PEFT IA3: scale vectors as overridable graph inputs, against PEFT.

Each IA3 adapter has output scales and input scales (feedforward_modules), its vectors moved away
from ones; on GPT-2 the output scale covers the fused c_attn (Conv1D, a Gemm with its bias), on
Qwen2 it follows the bias Add of k_proj / v_proj (the bases' biases made random, so that a scale
missing one shows). One llama output also holds a LoRA adapter on some of the same modules, so that
a module has both a scale and a LoRA branch in the graph.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import load_model, peft_logits, sample_inputs
from onnx import helper, numpy_helper
from onnx_builders import (
    Unmerged,
    assert_decode_step_matches_peft,
    assert_each_file_matches_peft,
    compile_unmerged,
    write_onnx_adapter,
)
from peft import IA3Config
from test_onnx_parity import (
    ONNX_FP32_TOLERANCE,
    assert_matches,
    base_logits,
    genai_tokens,
    loaded_adapter,
    peft_tokens,
    prefill,
    prompt_of,
    seeded_adapter,
    session,
)
from test_peft_kinds import perturbed

from adaptrix.api.compile import compile_adapter
from adaptrix.binders.table import Module, Placement
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Role
from adaptrix.lowering.module_pairs import ModuleScales
from adaptrix.runtimes.onnx.session import open_onnx
from adaptrix.targets.onnx.graph import Use
from adaptrix.targets.onnx.ia3 import add_scale_inputs

pytestmark = pytest.mark.onnx_export

IA3_CONFIGS = {
    "llama": IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                       feedforward_modules=["down_proj"]),
    "gpt2": IA3Config(target_modules=["c_attn", "c_fc", "c_proj"], feedforward_modules=["c_fc"]),
    "qwen2": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}  # fmt: skip
# The LoRA adapter beside llama's IA3 one: on k_proj and down_proj too (an output and an input scale).
LLAMA_LORA = ["q_proj", "k_proj", "down_proj"]


def with_biases(family: str, base: Path, path: Path) -> Path:
    """The base with its biases (zeros as built) made random, so that a scale that missed one shows."""
    model = load_model(family, base)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compiled(bases, tmp_path_factory):
    """One unmerged onnx-cpu output per family (llama's with a LoRA adapter too), made on first use."""

    @functools.cache
    def get(family: str) -> Unmerged:
        root = tmp_path_factory.mktemp(f"ia3-{family}")
        base = with_biases(family, bases(family), root / "base")
        adapters = {"ia3": perturbed(load_model(family, base), IA3_CONFIGS[family], root / "ia3")}
        if family == "llama":
            adapters["lora"] = seeded_adapter(family, base, root / "lora", target_modules=LLAMA_LORA)
        return compile_unmerged(family, base, adapters, root / "out")

    return get


@pytest.mark.parametrize("family", sorted(IA3_CONFIGS))
def test_ia3_file_matches_peft_and_none_is_the_base(family, compiled):
    assert_each_file_matches_peft(compiled(family))


def test_decode_step_with_ia3_matches_peft(compiled):
    assert_decode_step_matches_peft(compiled("llama"), "ia3")


@pytest.mark.parametrize(
    ("family", "module", "axis", "features"),
    [
        ("llama", "model.layers.0.self_attn.k_proj", "out", 16),  # GQA: 2 kv heads of 8
        ("llama", "model.layers.1.mlp.down_proj", "in", 64),
        ("gpt2", "transformer.h.0.attn.c_attn", "out", 96),  # the whole fused q|k|v output
        ("gpt2", "transformer.h.1.mlp.c_fc", "in", 32),
    ],
)
def test_manifest_and_graph_hold_the_vectors(family, module, axis, features, compiled):
    """Listed like the LoRA inputs, kept out of the fed inputs, defaulting to ones, in the adapter file."""
    case = compiled(family)
    section = case.manifest["onnx"]
    name = f"{module}.ia3_{axis}"
    assert section["lora"]["inputs"][name] == {"shape": [features], "dtype": "float32", "module": module}
    assert name in section["lora"]["adapters"]["ia3"]["scales"] and name not in section["inputs"]
    graph = onnx.load(case.out / "model.onnx", load_external_data=False).graph
    assert name in {value.name for value in graph.input}
    default = next(init for init in graph.initializer if init.name == name)
    assert np.array_equal(numpy_helper.to_array(default), np.ones(features, np.float32))
    params = ort.AdapterFormat.read_adapter(str(case.adapter_file("ia3"))).get_parameters()
    vector = params[name].numpy()
    assert vector.shape == (features,) and not np.allclose(vector, 1.0)
    assert [node.op_type for node in graph.node if name in node.input] == ["Mul"]


def test_lora_file_beside_ia3_has_no_vectors(compiled):
    case = compiled("llama")
    entry = case.manifest["onnx"]["lora"]["adapters"]["lora"]
    assert "scales" not in entry and set(entry["ranks"]) >= {"model.layers.0.self_attn.k_proj"}
    params = ort.AdapterFormat.read_adapter(str(case.adapter_file("lora"))).get_parameters()
    assert not any(".ia3_" in name for name in params)


def test_misfit_vector_is_refused(compiled, tmp_path):
    case = compiled("llama")
    read = ort.AdapterFormat.read_adapter(str(case.adapter_file("ia3")))
    params = {name: value.numpy() for name, value in read.get_parameters().items()}
    name = "model.layers.0.mlp.down_proj.ia3_in"
    params[name] = np.ones(63, np.float32)
    file = write_onnx_adapter(tmp_path / "misfit.onnx_adapter", params, read.get_model_version())
    with pytest.raises(BadInputError, match=rf"parameter {name}: expected shape \[64\], found \[63\]"):
        open_onnx(case.out).load_adapter(file)
    open_onnx(case.out).load_adapter("ia3")  # the compiled one fits


def test_output_scale_needs_the_bias_add_after_the_matmul():
    """A bias added anywhere but right after the MatMul: the output Mul would miss it, so refused."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    bias = numpy_helper.from_array(np.ones(4, np.float32), "proj.bias")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="/proj/MatMul"),
        helper.make_node("Relu", ["mm"], ["relu"], name="/proj/Relu"),
        helper.make_node("Add", ["relu", "proj.bias"], ["y"], name="/proj/Add"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [value("y", onnx.TensorProto.FLOAT, [1, 4])], [weight, bias])  # fmt: skip
    uses = {"proj.weight": [Use(0, 1, "w", True, True)], "proj.bias": [Use(2, 1, "proj.bias", False, False)]}
    placement = Placement("proj", 0, "proj", Module((Role.ATTN_Q,)))
    scales = ModuleScales(placement, "proj.weight", "proj.bias", torch.ones(4), None)
    with pytest.raises(UnsupportedError, match="proj: the exported graph does not add its bias right after"):
        add_scale_inputs(helper.make_model(graph), uses, [scales])


def test_both_files_active_scale_the_lora_branch_too(compiled, tmp_path):
    """IA3 and LoRA active at once: y = v_out * ((x * v_in) (W + A B)), PEFT's IA3 on the LoRA-merged base."""
    case = compiled("llama")
    merged = compile_adapter(case.adapters["lora"], case.base, "merged", tmp_path / "merged").out
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", merged, case.adapters["ia3"], inputs)
    options = ort.RunOptions()
    for name in ("ia3", "lora"):
        options.add_active_adapter(loaded_adapter(case.adapter_file(name)))
    got = prefill(session(case.out), inputs, options)
    assert_matches(got, expected, base_logits("llama", case.base, inputs), ONNX_FP32_TOLERANCE)


def test_genai_and_open_onnx_generate_peft_tokens_with_ia3(compiled):
    """og.Adapters and adaptrix's own session take the IA3 file as they take a LoRA one."""
    case = compiled("llama")
    prompt = prompt_of("llama")
    expected = peft_tokens("llama", case.base, case.adapters["ia3"], prompt)
    assert expected != peft_tokens("llama", case.base, None, prompt)
    assert genai_tokens(case.out, prompt, case.adapter_file("ia3")) == expected
    assert open_onnx(case.out).generate(list(prompt), len(expected), adapter="ia3") == expected
