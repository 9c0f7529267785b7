"""ONNX without optimum: onnxruntime-genai's builder graph (transformers 5) and torch.onnx agree with PEFT.

The exporter is chosen from what is installed and recorded in the manifest; optimum's own graphs
are tested in test_onnx_parity. PEFT's forward is the reference: logits of a batch, and greedy
decoding through the artifact's KV cache against PEFT's forward over the whole prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import TRANSFORMERS_5, VOCAB, load_model, make_adapter, model_logits, peft_logits, sample_inputs
from peft import PeftModel

from adaptrix.api.compile import compile_adapter
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.runtimes.onnx.session import open_onnx
from adaptrix.targets.onnx import exporters

ONNX_FP32_TOLERANCE = 5e-4  # as test_onnx_parity's
FP16_TOLERANCE = 5e-3  # as test_onnx_parity's: float16 weights and activations against PEFT in float32
NEW_TOKENS = 6
needs_builder = pytest.mark.skipif(
    not exporters.has_builder(), reason="onnxruntime-genai's model builder needs transformers 5 and onnx-ir"
)
only_457 = pytest.mark.skipif(TRANSFORMERS_5, reason="MoE bases need transformers 4.57 (builders.MOE)")
only_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 keeps experts as Linear modules")
# GroupQueryAttention's CPU kernel takes head sizes that are multiples of 16: hidden 64 / 4 heads.
GQA_HEADS = {"hidden_size": 64}
MOE_TARGETS = {
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"],
    "qwen2_moe": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "gate", "shared_expert_gate"],
}

# transformers 5 packs the experts: PEFT reaches them (and the router, no Linear) as parameters
_PACKED = ["experts.gate_up_proj", "experts.down_proj"]
PACKED_MOE_TARGETS = {
    "mixtral": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    target_parameters=["gate.weight", *_PACKED]),
    "qwen2_moe": dict(target_modules=["q_proj", "v_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                                      "shared_expert.down_proj", "shared_expert_gate"],
                      target_parameters=["mlp.gate.weight", *_PACKED]),
    "qwen3_moe": dict(target_modules=["k_proj", "o_proj"], target_parameters=["mlp.gate.weight", *_PACKED]),
}  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One export cache for the module's compiles."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture
def without_optimum(monkeypatch):
    """As where optimum's exporter is not installed (the transformers 5 environment)."""
    monkeypatch.setattr(exporters, "has_optimum", lambda: False)


def _compile(adapter: Path, base: Path, out: Path, cache: Path, **options) -> dict:
    compile_adapter(adapter, base, "onnx-cpu", out, cache_dir=cache, **options)
    return json.loads((out / "manifest.json").read_text())["onnx"]


def _adapter(family: str, base: Path, path: Path, **lora) -> Path:
    torch.manual_seed(1)  # PEFT draws the LoRA weights from torch's global generator
    return make_adapter(family, base, path, **lora)


def _check_logits(family: str, base: Path, adapter: Path, out: Path, name: str | None = None) -> None:
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs).numpy()
    feeds = {k: v.numpy() for k, v in inputs.items() if k != "input_ids"}
    types = feeds.pop("token_type_ids", None)
    ids = inputs["input_ids"].numpy()
    got = open_onnx(out).logits(ids, feeds.get("attention_mask"), token_type_ids=types, adapter=name)
    error = float(np.abs(got - expected).max())
    effect = float(np.abs(expected - model_logits(family, base, inputs).numpy()).max())
    assert error <= ONNX_FP32_TOLERANCE, error
    assert error <= 1e-2 * effect, (error, effect)  # the adapter's effect is in the graph


@torch.no_grad()
def _check_decoding(family: str, base: Path, adapter: Path, out: Path, name: str | None = None) -> None:
    """Greedy decoding with the artifact's KV cache, step by step, against PEFT's full forward."""
    model = PeftModel.from_pretrained(load_model(family, base), adapter).eval()
    artifact = open_onnx(out)
    ids = sample_inputs(family, batch=1)["input_ids"]
    logits, past = artifact.step(ids.numpy(), adapter=name)
    tokens = []
    for _ in range(NEW_TOKENS):
        expected = model(torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)).logits[:, -1]
        assert float(np.abs(logits[:, -1] - expected.numpy()).max()) <= ONNX_FP32_TOLERANCE
        tokens.append(int(expected.argmax()))
        logits, past = artifact.step(np.array([tokens[-1:]]), past, adapter=name)
    assert artifact.generate(ids[0].tolist(), NEW_TOKENS, adapter=name) == tokens


@needs_builder
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q / k / v biases packed too
def test_builder_graph_with_the_adapter_merged_equals_peft(family, bases, tmp_path, cache):
    base = bases(family, "gqa-heads", **GQA_HEADS)
    adapter = _adapter(family, base, tmp_path / "adapter")
    section = _compile(adapter, base, tmp_path / "out", cache)
    assert section["exporter"] == "genai-builder"
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= {n.op_type for n in graph.node}
    assert any("qkv_proj" in init.name for init in graph.initializer)  # q / k / v patched as slices
    genai = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.onnx"
    _check_logits(family, base, adapter, tmp_path / "out")
    _check_decoding(family, base, adapter, tmp_path / "out")
    _check_genai(tmp_path / "out")
    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0  # GroupQueryAttention takes its positions from the mask: padding would shift them
    with pytest.raises(BadInputError, match="no padding"):
        open_onnx(tmp_path / "out").logits(np.full((2, 5), 7), mask)


def _check_genai(out: Path) -> None:
    """onnxruntime-genai runs the artifact (the builder's config) to the tokens Adaptrix's runtime decodes."""
    import onnxruntime_genai as og

    prompt = [5, 17, 33]
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    ours = open_onnx(out).generate(prompt, NEW_TOKENS)
    assert tokens and ours[: len(tokens)] == tokens, (tokens, ours)
    if len(tokens) < NEW_TOKENS:  # genai stops at (and leaves out) an end-of-sequence token
        eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
        assert ours[len(tokens)] in (eos if isinstance(eos, list) else [eos]), (tokens, ours)


@needs_builder
def test_a_builder_graph_that_is_not_the_forward_is_refused(bases, tmp_path, cache, monkeypatch):
    # The builder's OLMo graph is 0.16 off its PyTorch forward (so OLMo is not in the builder's set)
    widened = exporters.BUILDER_ARCHITECTURES | {"OlmoForCausalLM"}
    monkeypatch.setattr(exporters, "BUILDER_ARCHITECTURES", widened)
    base = bases("olmo", "gqa-heads", **GQA_HEADS)
    adapter = _adapter("olmo", base, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="genai-builder's graph of this olmo base does not compute"):
        _compile(adapter, base, tmp_path / "out", cache)
    assert not (tmp_path / "out").exists()


@needs_builder
def test_builder_graph_unmerged_adapter_files_equal_peft(bases, tmp_path, cache):
    base = bases("llama", "gqa-heads", **GQA_HEADS)
    first = _adapter("llama", base, tmp_path / "first")
    targets = ["q_proj", "v_proj", "down_proj"]
    second = _adapter("llama", base, tmp_path / "second", r=2, target_modules=targets)
    out = tmp_path / "out"
    compile_adapter([first, second], base, "onnx-cpu", out, cache_dir=cache, unmerged=True)
    section = json.loads((out / "manifest.json").read_text())["onnx"]
    assert section["exporter"] == "genai-builder"
    assert sorted(section["lora"]["adapters"]) == ["first", "second"]
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert "GroupQueryAttention" in {n.op_type for n in graph.node}
    for name, adapter in (("first", first), ("second", second)):
        _check_logits("llama", base, adapter, out, name)
    _check_decoding("llama", base, second, out, "second")
    inputs = sample_inputs("llama")
    plain = open_onnx(out).logits(inputs["input_ids"].numpy())  # no adapter active: the base
    assert np.abs(plain - model_logits("llama", base, inputs).numpy()).max() <= ONNX_FP32_TOLERANCE


@needs_builder
def test_builder_graph_for_cuda_is_float16_and_equals_peft(bases, tmp_path, cache):
    # The fp16 graph the builder writes for the CUDA provider, run here on the CPU provider
    # (checked on a GPU by tests/test_cuda.py where one is lent)
    base = bases("llama", "gqa-heads", **GQA_HEADS)
    adapter = _adapter("llama", base, tmp_path / "adapter")
    out = tmp_path / "out"
    compile_adapter(adapter, base, "onnx-cuda", out, cache_dir=cache)
    section = json.loads((out / "manifest.json").read_text())["onnx"]
    assert section["exporter"] == "genai-builder"
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the KV cache
    inputs = sample_inputs("llama")
    got = open_onnx(out).logits(inputs["input_ids"].numpy()).astype(np.float32)
    expected = peft_logits("llama", base, adapter, inputs).numpy()
    assert np.abs(got - expected).max() <= FP16_TOLERANCE
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert "cuda" in genai["session_options"]["provider_options"][0]  # onnxruntime-genai runs it on the GPU
    if "CUDAExecutionProvider" in ort.get_available_providers():  # where a GPU is lent: on the provider
        got = open_onnx(out, provider="cuda").logits(inputs["input_ids"].numpy()).astype(np.float32)
        assert np.abs(got - expected).max() <= FP16_TOLERANCE


@needs_builder
def test_builder_graph_quantized_int4_keeps_the_adapter(bases, tmp_path, cache):
    base = bases("llama", "gqa-heads", **GQA_HEADS)
    adapter = _adapter("llama", base, tmp_path / "adapter")
    section = _compile(adapter, base, tmp_path / "out", cache, quantize="int4", block_size=32)
    assert section["exporter"] == "genai-builder" and section["quantized"]["weights"] > 0
    inputs = sample_inputs("llama")
    got = open_onnx(tmp_path / "out").logits(inputs["input_ids"].numpy())
    expected = peft_logits("llama", base, adapter, inputs).numpy()
    plain = model_logits("llama", base, inputs).numpy()
    assert np.abs(got - expected).mean() < np.abs(got - plain).mean()  # closer to the adapted model


@needs_builder
def test_a_base_with_an_mlp_as_wide_as_the_vocabulary_is_exported_by_torch_onnx(bases, tmp_path, cache):
    """The builder would take its gate / up projections for the LM head (vocab_size outputs)."""
    base = bases("llama", "gqa-heads-vocab-mlp", **GQA_HEADS, intermediate_size=VOCAB)
    adapter = _adapter("llama", base, tmp_path / "adapter")
    assert _compile(adapter, base, tmp_path / "out", cache)["exporter"] == "torch.onnx"
    _check_logits("llama", base, adapter, tmp_path / "out")


@needs_builder
def test_builder_graph_refuses_what_it_cannot_take(bases, tmp_path, cache):
    base = bases("llama", "gqa-heads", **GQA_HEADS)
    adapter = _adapter("llama", base, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="--calibration"):
        prompts = tmp_path / "prompts.json"
        prompts.write_text("[[5, 6, 7]]")
        _compile(adapter, base, tmp_path / "out", cache, quantize="int4", calibration=prompts)
    assert not (tmp_path / "out").exists()


def test_torch_onnx_encoder_equals_peft(bases, tmp_path, cache, without_optimum):
    base = bases("bert")
    adapter = _adapter("bert", base, tmp_path / "adapter")
    assert _compile(adapter, base, tmp_path / "out", cache)["exporter"] == "torch.onnx"
    _check_logits("bert", base, adapter, tmp_path / "out")


def test_torch_onnx_decoder_equals_peft(bases, tmp_path, cache, without_optimum):
    # gpt2: a decoder the builder does not build (and llama's 8-wide heads, which GQA does not run)
    base = bases("gpt2")
    adapter = _adapter("gpt2", base, tmp_path / "adapter")
    assert _compile(adapter, base, tmp_path / "out", cache)["exporter"] == "torch.onnx"
    _check_logits("gpt2", base, adapter, tmp_path / "out")
    _check_decoding("gpt2", base, adapter, tmp_path / "out")


@only_457
@pytest.mark.parametrize("family", sorted(MOE_TARGETS))
def test_moe_onnx_with_lora_on_experts_router_and_attention_equals_peft(family, bases, tmp_path, cache):
    base = bases(family)
    adapter = _adapter(family, base, tmp_path / "adapter", target_modules=MOE_TARGETS[family])
    assert _compile(adapter, base, tmp_path / "out", cache)["exporter"] == "torch.onnx"
    _check_logits(family, base, adapter, tmp_path / "out")
    _check_decoding(family, base, adapter, tmp_path / "out")


@only_5
@pytest.mark.parametrize("family", sorted(PACKED_MOE_TARGETS))
def test_packed_moe_onnx_lora_on_experts_router_attention_equals_peft(family, bases, tmp_path, cache):
    base = bases(family)
    adapter = _adapter(family, base, tmp_path / "adapter", **PACKED_MOE_TARGETS[family])
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    assert _compile(adapter, base, tmp_path / "out", cache)["exporter"] == "torch.onnx"
    _check_logits(family, base, adapter, tmp_path / "out")
    _check_decoding(family, base, adapter, tmp_path / "out")


def _sliced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The packed experts run one slice at a time: the exporter folds each slice into a constant."""
    dense = torch.zeros(hidden_states.shape[0], self.gate_up_proj.shape[0]).scatter(
        1, top_k_index, top_k_weights
    )
    out = torch.zeros_like(hidden_states)
    for index in range(self.gate_up_proj.shape[0]):
        gate, up = torch.nn.functional.linear(hidden_states, self.gate_up_proj[index]).chunk(2, dim=-1)
        out = out + dense[:, index : index + 1] * (self.act_fn(gate) * up) @ self.down_proj[index].T
    return out


@only_5
def test_packed_experts_the_graph_does_not_keep_whole_are_refused_naming_them(bases, tmp_path, monkeypatch):
    # an export whose packed parameters were folded away: no rows to patch, never a graph without them
    from adaptrix.targets.onnx import torch_export

    monkeypatch.setattr(torch_export, "dense_packed_experts_forward", _sliced_experts_forward)
    base = bases("mixtral")
    adapter = _adapter("mixtral", base, tmp_path / "adapter", **PACKED_MOE_TARGETS["mixtral"])
    with pytest.raises(
        UnsupportedError, match=r"module model\.layers\.0\.block_sparse_moe\.experts\.0\.w"
    ) as caught:
        _compile(adapter, base, tmp_path / "out", tmp_path / "cache")
    assert "gate_up_proj" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_seq2seq_without_optimum_is_refused_naming_it(bases, peft_adapters, tmp_path, cache, without_optimum):
    with pytest.raises(UnsupportedError, match="optimum-onnx"):
        _compile(peft_adapters("t5"), bases("t5"), tmp_path / "out", cache)
    assert not (tmp_path / "out").exists()


@only_457
def test_an_moe_block_routed_otherwise_is_refused_naming_it(tmp_path, cache):
    # GLM-4-MoE routes by grouped top-k with score biases: a trace would freeze one input's experts
    from coverage_sweep import build_reference

    ref = build_reference("glm4_moe", "causal", tmp_path)
    with pytest.raises(UnsupportedError, match="Glm4MoeMoE") as caught:
        _compile(ref.adapter, ref.base, tmp_path / "out", cache)
    assert "--target merged" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@only_457
def test_a_torch_onnx_graph_that_is_not_the_forward_is_refused(tmp_path, cache, without_optimum):
    # Doge's eager attention (the one a trace follows) differs from its default sdpa one by ~0.2
    from coverage_sweep import build_reference

    ref = build_reference("doge", "causal", tmp_path)
    with pytest.raises(UnsupportedError, match="does not compute its PyTorch forward") as caught:
        _compile(ref.adapter, ref.base, tmp_path / "out", cache)
    assert "doge" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
