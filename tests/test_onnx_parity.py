"""onnx-cpu / onnx-cuda, merged: onnxruntime, optimum and onnxruntime-genai agree with PEFT.

Each family's base is exported once (the export cache lives in the session's XDG cache) and its
merged output compiled once; the tests below share those outputs. The helpers here (feeding a
graph by input name, prefill and decode steps) are used by test_onnx_unmerged too.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import FAMILIES, ONNX_FAMILIES, load_model, make_adapter, peft_logits, sample_inputs
from peft import PeftModel

from adaptrix.api.compile import compile_adapter

pytestmark = pytest.mark.onnx_export

# onnxruntime fuses and reorders float32 kernels (attention, layer norm, GELU); measured <= 6.4e-7.
ONNX_FP32_TOLERANCE = 5e-4
# float16 weights and activations against PEFT in float32; measured 6.2e-4 (llama), 4.4e-5 (bert)
# on the CPU provider; the CUDA provider's float16 kernels are held to the same bound.
FP16_TOLERANCE = 5e-3
# The error must also stay under this share of what the adapter changes, so that a small bound
# cannot pass an output that ignores an adapter whose effect is small (bert's classifier head).
ADAPTER_SHARE = 1e-2
DECODERS = sorted(f for f in ONNX_FAMILIES if not FAMILIES[f].encoder)
ENCODERS = sorted(f for f in ONNX_FAMILIES if FAMILIES[f].encoder)
# onnxruntime-genai refuses an eos outside the vocab (the builders' gpt2 keeps GPT-2's 50256)
# or none at all (qwen2's default), so those bases get in-vocab special tokens.
SPECIAL_TOKENS = {"gpt2": {"bos_token_id": 1, "eos_token_id": 2}, "qwen2": {"eos_token_id": 2}}
NEW_TOKENS = 8


def onnx_base(bases, family: str) -> Path:
    """The shared base of `family`, with special tokens every ONNX runtime accepts."""
    if family in SPECIAL_TOKENS:
        return bases(family, "in-vocab-special-tokens", **SPECIAL_TOKENS[family])
    return bases(family)


def seeded_adapter(family: str, base: Path, path: Path, seed: int = 1, **lora) -> Path:
    """make_adapter, reproducible: PEFT draws the LoRA weights from torch's global generator."""
    torch.manual_seed(seed)
    return make_adapter(family, base, path, seed=seed, **lora)


def session(out: Path, providers=("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An onnxruntime session over `out`/model.onnx (quiet about unused initializers)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(out / "model.onnx"), options, providers=list(providers))


@functools.cache
def loaded_adapter(adapter_file: Path) -> ort.LoraAdapter:
    """An `.onnx_adapter` loaded once and kept alive: RunOptions holds no reference to it."""
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    return adapter


def activate(adapter_file: Path) -> ort.RunOptions:
    """Run options with one `.onnx_adapter` active."""
    options = ort.RunOptions()
    options.add_active_adapter(loaded_adapter(adapter_file))
    return options


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: cumsum(mask) - 1, padding clipped to 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def step(sess, ids, mask, positions=None, past=None, token_types=None, run_options=None) -> dict:
    """One run fed by input name; `past` is the previous step's outputs (None: an empty cache)."""
    given = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "token_type_ids": token_types,
    }
    feeds = {}
    for value in sess.get_inputs():
        if value.name.startswith("past_key_values."):
            if past is not None:
                feeds[value.name] = past[value.name.replace("past_key_values.", "present.")]
            else:
                dtype = np.float16 if value.type == "tensor(float16)" else np.float32
                feeds[value.name] = np.zeros((ids.shape[0], value.shape[1], 0, value.shape[3]), dtype)
        elif value.name in given:
            feeds[value.name] = np.ascontiguousarray(given[value.name].numpy())
    names = [value.name for value in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds, run_options), strict=True))


def prefill(sess, inputs: dict, run_options=None) -> torch.Tensor:
    """The logits of `inputs` (as sample_inputs gives them) in one run with an empty cache."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    outputs = step(sess, ids, mask, positions_of(mask), None, inputs.get("token_type_ids"), run_options)
    return torch.from_numpy(outputs["logits"])


def max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| in float32 after checking the shapes agree."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float((got.float() - expected.float()).abs().max())


def assert_matches(got, expected, base_logits, tolerance: float) -> float:
    """got is within `tolerance` of expected and far nearer to it than the base is."""
    diff = max_diff(got, expected)
    assert diff <= tolerance, diff
    assert diff <= ADAPTER_SHARE * max_diff(base_logits, expected), (diff, max_diff(base_logits, expected))
    return diff


@torch.no_grad()
def base_logits(family: str, base: Path, inputs: dict) -> torch.Tensor:
    return load_model(family, base)(**inputs).logits


@dataclass(frozen=True)
class Compiled:
    """A base, an adapter for it and the merged onnx-cpu output."""

    family: str
    base: Path
    adapter: Path
    out: Path


@pytest.fixture(scope="session")
def merged(bases, tmp_path_factory):
    """One merged onnx-cpu output per family, compiled on first use."""
    made: dict[str, Compiled] = {}

    def get(family: str) -> Compiled:
        if family not in made:
            root = tmp_path_factory.mktemp(f"onnx-merged-{family}")
            base = onnx_base(bases, family)
            adapter = seeded_adapter(family, base, root / "adapter")
            compile_adapter(adapter, base, "onnx-cpu", root / "out")
            made[family] = Compiled(family, base, adapter, root / "out")
        return made[family]

    return get


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_prefill_matches_peft(family, merged):
    case = merged(family)
    inputs = sample_inputs(family)
    expected = peft_logits(family, case.base, case.adapter, inputs)
    got = prefill(session(case.out), inputs)
    assert got.dtype == torch.float32
    assert_matches(got, expected, base_logits(family, case.base, inputs), ONNX_FP32_TOLERANCE)
    manifest = json.loads((case.out / "manifest.json").read_text())
    section = manifest["onnx"]
    graph = onnx.load(case.out / "model.onnx", load_external_data=False).graph
    assert section["inputs"] == [value.name for value in graph.input]
    assert section["outputs"] == [value.name for value in graph.output]
    assert section["task"] == ("text-classification" if family in ENCODERS else "text-generation-with-past")
    assert manifest["dtype"] == "float32" and section["quantize"] is None and "lora" not in section
    assert all((case.out / name).is_file() for name in manifest["files"])
    assert ("genai_config.json" in manifest["files"]) == (family in DECODERS)


FUSED_ATTENTION = {"llama", "mistral", "qwen2"}


@pytest.mark.parametrize("family", DECODERS)
def test_llama_family_attention_is_fused_and_others_say_why_not(family, merged):
    """onnx-cpu decoders of the Llama family run GroupQueryAttention; the rest keep the export's graph."""
    case = merged(family)
    attention = json.loads((case.out / "manifest.json").read_text())["onnx"]["attention"]
    ops = {node.op_type for node in onnx.load(case.out / "model.onnx", load_external_data=False).graph.node}
    if family in FUSED_ATTENTION:
        layers = json.loads((case.base / "config.json").read_text())["num_hidden_layers"]
        assert attention == {"fused_layers": layers, "declined": None}
        assert {"GroupQueryAttention", "RotaryEmbedding"} <= ops and "Softmax" not in ops
    else:
        assert attention["fused_layers"] == 0 and "model_type" in attention["declined"]
        assert "GroupQueryAttention" not in ops


def test_float16_onnx_cpu_decoder_keeps_the_exported_attention(bases, tmp_path):
    """--dtype float16 on onnx-cpu: the fusion (written for float32) declines and the graph runs."""
    base = onnx_base(bases, "llama")
    adapter = seeded_adapter("llama", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", dtype="float16")
    attention = json.loads((tmp_path / "out" / "manifest.json").read_text())["onnx"]["attention"]
    assert attention["fused_layers"] == 0 and "float32" in attention["declined"]
    inputs = sample_inputs("llama")
    got = prefill(session(tmp_path / "out"), inputs)
    assert got.dtype == torch.float16
    expected = peft_logits("llama", base, adapter, inputs)
    assert_matches(got, expected, base_logits("llama", base, inputs), FP16_TOLERANCE)


@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_prefill_and_decode_step_match_peft(family, merged):
    """Batch of 2, the second row left-padded: prefill L-1 tokens, then one step with the cache."""
    case = merged(family)
    ids = sample_inputs(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = positions_of(mask)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_model(family, case.base), case.adapter).eval()
        expected = peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    sess = session(case.out)
    first = step(sess, ids[:, :-1], mask[:, :-1], positions[:, :-1])
    valid = mask[:, :-1].bool()
    assert max_diff(torch.from_numpy(first["logits"])[valid], expected[:, :-1][valid]) <= ONNX_FP32_TOLERANCE
    last = step(sess, ids[:, -1:], mask, positions[:, -1:], past=first)
    assert max_diff(torch.from_numpy(last["logits"])[:, -1], expected[:, -1]) <= ONNX_FP32_TOLERANCE


@functools.cache
def peft_tokens(family: str, base: Path, adapter: Path | None, prompt: tuple[int, ...]) -> list[int]:
    """PEFT's greedy continuation of `prompt` (the base's when `adapter` is None)."""
    model = load_model(family, base)
    model = PeftModel.from_pretrained(model, adapter).eval() if adapter else model
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def prompt_of(family: str) -> tuple[int, ...]:
    return tuple(sample_inputs(family, batch=1)["input_ids"][0].tolist())


def optimum_tokens(
    out: Path, prompt: tuple[int, ...], run_options=None, provider="CPUExecutionProvider"
) -> list[int]:
    """ORTModelForCausalLM's greedy continuation, the adapter of `run_options` active if given
    (on the CUDA provider with optimum's IO binding, its default there)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.log_severity_level = 3
    binding = provider == "CUDAExecutionProvider"
    model = ORTModelForCausalLM.from_pretrained(out, provider=provider, session_options=options,
                                                use_io_binding=binding)  # fmt: skip
    # optimum-onnx 0.1.0 sizes the empty past by num_key_value_heads for llama/mistral/qwen2 only.
    past = next(v for v in model.session.get_inputs() if v.name == "past_key_values.0.key")
    model.num_key_value_heads = past.shape[1]
    if run_options is not None:  # ORTModelForCausalLM passes no RunOptions of its own
        model.session.run = functools.partial(model.session.run, run_options=run_options)
    ids = torch.tensor([prompt], device=model.device)  # IO binding reads inputs where the model is
    out_ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    return out_ids[0, len(prompt) :].tolist()


def genai_tokens(out: Path, prompt: tuple[int, ...], adapter_file: Path | None = None) -> list[int]:
    """onnxruntime-genai's greedy continuation, with `adapter_file` active if given."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), adapter_file.stem)
        generator.set_active_adapter(adapters, adapter_file.stem)
    generator.append_tokens(np.array([prompt], np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("family", DECODERS)
def test_optimum_generates_peft_tokens(family, merged):
    case = merged(family)
    prompt = prompt_of(family)
    expected = peft_tokens(family, case.base, case.adapter, prompt)
    assert expected != peft_tokens(family, case.base, None, prompt)  # the adapter changes the tokens
    assert optimum_tokens(case.out, prompt) == expected


@pytest.mark.parametrize("family", DECODERS)
def test_genai_generates_peft_tokens(family, merged):
    case = merged(family)
    prompt = prompt_of(family)
    assert genai_tokens(case.out, prompt) == peft_tokens(family, case.base, case.adapter, prompt)
    # the KV buffer is shared (appended in place) exactly where GroupQueryAttention holds the cache
    graph = onnx.load(case.out / "model.onnx", load_external_data=False).graph
    share = json.loads((case.out / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    assert share is any(node.op_type == "GroupQueryAttention" for node in graph.node)


@pytest.mark.parametrize("family", ENCODERS)
def test_optimum_sequence_classification_matches_peft(family, merged):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    case = merged(family)
    inputs = sample_inputs(family)
    expected = peft_logits(family, case.base, case.adapter, inputs)
    model = ORTModelForSequenceClassification.from_pretrained(case.out, provider="CPUExecutionProvider")
    got = model(**inputs).logits
    assert_matches(got, expected, base_logits(family, case.base, inputs), ONNX_FP32_TOLERANCE)


def test_second_compile_reuses_the_cached_export(bases, tmp_path, monkeypatch):
    """--cache-dir holds the export; a second adapter for the same base is patched into it."""
    from typer.testing import CliRunner

    from adaptrix.cli import app
    from adaptrix.targets.onnx import export

    base = bases("llama")
    first = seeded_adapter("llama", base, tmp_path / "first", seed=1)
    second = seeded_adapter(
        "llama", base, tmp_path / "second", seed=5, r=8, target_modules=["q_proj", "up_proj"]
    )
    cache = tmp_path / "cache"
    args = ["compile", str(first), "--base", str(base), "--target", "onnx-cpu", "-o", str(tmp_path / "one")]
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    entries = [entry for entry in cache.iterdir() if (entry / "export.json").is_file()]
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file()

    def no_second_export(*args, **kwargs):
        raise AssertionError("the base was exported again")

    monkeypatch.setattr(export, "_export", no_second_export)
    compile_adapter(second, base, "onnx-cpu", tmp_path / "two", cache_dir=cache)
    assert list(cache.iterdir()) == entries
    inputs = sample_inputs("llama")
    expected = peft_logits("llama", base, second, inputs)
    got = prefill(session(tmp_path / "two"), inputs)
    assert_matches(got, expected, base_logits("llama", base, inputs), ONNX_FP32_TOLERANCE)
    keys = [
        json.loads((tmp_path / out / "manifest.json").read_text())["onnx"]["base_export"]
        for out in ("one", "two")
    ]
    assert keys[0] == keys[1] and entries[0].name == keys[0][:32]


def float_types(out: Path) -> set[str]:
    """The element types of the graph's floating point initializers."""
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    names = {onnx.TensorProto.DataType.Name(init.data_type) for init in graph.initializer}
    return names & {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"}


# GPT-2 and GPT-NeoX are here because optimum's own fp16 export broke them (mixed-type LayerNorm).
CUDA_FAMILIES = ("llama", "gpt2", "gpt_neox", "bert")


@pytest.fixture(scope="module")
def cuda_outputs(bases, tmp_path_factory):
    """onnx-cuda outputs (float16 by default) of a decoder and an encoder."""
    made = {}
    for family in CUDA_FAMILIES:
        root = tmp_path_factory.mktemp(f"onnx-cuda-{family}")
        base = onnx_base(bases, family)
        adapter = seeded_adapter(family, base, root / "adapter")
        compile_adapter(adapter, base, "onnx-cuda", root / "out")
        made[family] = Compiled(family, base, adapter, root / "out")
    return made


@pytest.mark.parametrize("family", CUDA_FAMILIES)
def test_onnx_cuda_weights_are_float16(family, cuda_outputs):
    assert float_types(cuda_outputs[family].out) == {"FLOAT16"}


@pytest.mark.parametrize("family", CUDA_FAMILIES)
def test_onnx_cuda_is_float16_and_runs_on_the_cpu_provider(family, cuda_outputs):
    case = cuda_outputs[family]
    manifest = json.loads((case.out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["target"] == "onnx-cuda"
    graph = onnx.load(case.out / "model.onnx", load_external_data=False).graph
    float_values = [v for v in [*graph.input, *graph.output] if v.name not in ("input_ids", "attention_mask",
                    "position_ids", "token_type_ids")]  # fmt: skip
    assert {v.type.tensor_type.elem_type for v in float_values} == {onnx.TensorProto.FLOAT16}
    assert "FLOAT16" in float_types(case.out)
    if family in DECODERS:
        genai = json.loads((case.out / "genai_config.json").read_text())
        assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    inputs = sample_inputs(family)
    got = prefill(session(case.out), inputs)
    assert got.dtype == torch.float16
    expected = peft_logits(family, case.base, case.adapter, inputs)
    assert_matches(got, expected, base_logits(family, case.base, inputs), FP16_TOLERANCE)


# On onnxruntime's CUDA provider: tests/test_cuda.py.
