"""The gguf target: llama.cpp (llama-cpp-python) runs the GGUF and computes what PEFT's forward computes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from builders import VOCAB, load_model, make_adapter, peft_logits, sample_inputs
from gguf_builders import llama_greedy, llama_logits, save_tokenizer
from peft import PeftModel

from adaptrix.api.compile import compile_adapter
from adaptrix.ir.errors import BadInputError, UnsupportedError

# llama.cpp in float32 with a float32 KV cache (gguf_builders.llama_logits) matches PEFT to float32
# rounding: measured <= 4e-7 on these models. 1e-5 leaves room for another CPU's summation order.
F32_TOLERANCE = 1e-5
# Families with a GELU: ggml computes it with the tanh approximation read from a float16 table, where
# transformers uses exact erf (GPT-NeoX, Gemma's gelu_pytorch_tanh in float32): measured 1.2e-4 (gpt2)
# to 4e-4 (gpt_neox) on logits of magnitude ~0.4.
GELU_TOLERANCE = 1e-3
# The same GELU families, LoRA applied at run time vs merged: the same weights to float32 rounding, but
# ggml's GELU rounds its input to float16 for the table, which turns 1e-7 differences into up to
# one float16 step of an activation (measured 2.3e-5 for gpt2).
GELU_LORA_TOLERANCE = 1e-4
# float16 weights: each weight rounded to 11 significant bits; measured <= 1.5e-3 here.
F16_TOLERANCE = 5e-3
EXACT = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "granite",
         "olmo", "olmo2", "stablelm", "smollm3", "cohere", "olmo3",
         "arcee", "seed_oss", "exaone4", "cohere2", "glm4",
         "ernie4_5", "nemotron", "olmoe", "glm", "mamba", "granitemoe", "lfm2", "apertus",
         "falcon_mamba", "hunyuan_v1_dense", "hunyuan_v1_moe", "deepseek_v2", "deepseek_v3",
         "dbrx", "jamba", "ernie4_5_moe", "dots1", "glm4_moe", "mamba2", "granitemoeshared")  # fmt: skip
# 64 layers of float32 rounding (EXAONE 4's tiny model): measured 8e-6
DEEP = {"exaone4": 1e-4}
GELU = ("gpt2", "gpt_neox", "gemma", "gemma2", "gemma3_text", "starcoder2", "phi", "falcon", "bloom",
        "gpt_bigcode", "mpt")  # fmt: skip
_GRANITE = {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
            "logits_scaling": 3.0}  # fmt: skip
# What llama.cpp's graph hard-codes, set in the tiny configs (real checkpoints have these values):
# Gemma 2 / 3 scale queries by 1/sqrt(head_dim); Qwen3-MoE renormalizes the top-k routing weights.
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3_text": {"query_pre_attn_scalar": 16},
             "qwen3_moe": {"norm_topk_prob": True},
             # not llama's 1 and 1/sqrt(head_dim): each multiplier must reach llama.cpp's graph
             "olmo": {"clip_qkv": 0.1},  # clamps these q / k / v (the logits move by ~0.1)
             "stablelm": {"use_qkv_bias": True},  # as StableLM 2 1.6B
             "smollm3": {"num_hidden_layers": 4},  # the fourth layer has no rope
             "olmo3": {"num_hidden_layers": 4, "sliding_window": 4},  # 3 sliding layers: the window bites
             # llama.cpp's EXAONE 4 has sliding windows and rope-less global layers only with 64 layers
             "exaone4": {"num_hidden_layers": 64, "sliding_window": 4},
             # 3 sliding layers and a global one without rope; logits scaled by 0.5, not 0.0625
             "cohere2": {"num_hidden_layers": 4, "sliding_window": 4, "logit_scale": 0.5},
             "granite": _GRANITE, "granitemoe": _GRANITE, "granitemoeshared": _GRANITE}  # fmt: skip
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def made(bases, tmp_path_factory):
    """(base with a tokenizer, adapter) per family, built once."""
    cache = {}

    def get(family: str, **lora):
        key = (family, repr(sorted(lora.items())))
        if key not in cache:
            base = bases(family, "gguf-vectors", **OVERRIDES.get(family, {}))
            if not (base / "tokenizer.json").is_file():
                _jitter_vectors(base)
                save_tokenizer(base)
            torch.manual_seed(1)
            path = tmp_path_factory.mktemp(f"gguf-adapter-{family}")
            cache[key] = base, make_adapter(family, base, path, **lora)
        return cache[key]

    return get


def _jitter_vectors(base) -> None:
    """Seeded noise on every norm weight and bias: a family's freshly built ones (all 1 or all 0) would
    not tell a swapped or dropped vector from the right one."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(3)
    tensors = load_file(base / "model.safetensors")
    for name, value in tensors.items():
        if value.dim() == 1 and value.is_floating_point():
            tensors[name] = value + 0.1 * torch.randn(value.shape, generator=generator)
        if ".act_fn." in name:  # Apertus' xIELU parameters: bfloat16-exact, as transformers 4.57 loads them
            tensors[name] = tensors[name].bfloat16().float()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})


def _ids(family: str) -> list[int]:
    return sample_inputs(family, batch=1)["input_ids"][0].tolist()


@torch.no_grad()
def _peft_greedy(family, base, adapter, ids: list[int]) -> list[int]:
    model = PeftModel.from_pretrained(load_model(family, base), adapter).eval()
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", EXACT + GELU)
def test_f32_gguf_logits_and_greedy_tokens_equal_pefts(made, tmp_path, family):
    base, adapter = made(family)
    out = tmp_path / "out"
    compile_adapter(adapter, base, "gguf", out, quantize="f32")
    ids = _ids(family)
    expected = peft_logits(family, base, adapter, {"input_ids": torch.tensor([ids])})[0]
    got = llama_logits(out / "model.gguf", ids)
    assert got.shape == expected.shape == (len(ids), VOCAB)
    tolerance = GELU_TOLERANCE if family in GELU else DEEP.get(family, F32_TOLERANCE)
    assert (got - expected).abs().max().item() <= tolerance
    peft_tokens = _peft_greedy(family, base, adapter, ids)
    assert llama_greedy(out / "model.gguf", ids, NEW_TOKENS)[: len(peft_tokens)] == peft_tokens
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "gguf" and manifest["gguf"]["quantize"] == "f32"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_f16_gguf_logits_within_f16_tolerance_of_pefts(made, tmp_path, family):
    base, adapter = made(family)
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="f16")
    ids = _ids(family)
    expected = peft_logits(family, base, adapter, {"input_ids": torch.tensor([ids])})[0]
    got = llama_logits(tmp_path / "out" / "model.gguf", ids)
    assert (got - expected).abs().max().item() <= F16_TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# rank_pattern / alpha_pattern / rsLoRA: per-module scales that the GGUF LoRA must carry folded in B
_SCALES = {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}


@pytest.mark.parametrize(
    ("family", "lora"),
    [("llama", _SCALES), ("gpt2", {}), ("gpt_neox", {}), ("phi3", {}), ("mixtral", {}), ("falcon", {}),
     ("bloom", {}), ("mamba", {}), ("deepseek_v2", {"target_modules": ["o_proj"]})],
)  # fmt: skip
def test_gguf_lora_on_the_base_gguf_gives_the_merged_ggufs_logits(made, tmp_path, family, lora):
    base, adapter = made(family, **lora)
    compile_adapter(adapter, base, "gguf", tmp_path / "merged", quantize="f32")
    cache = tmp_path / "cache"
    compile_adapter(adapter, base, "gguf", tmp_path / "lora", quantize="f32", unmerged=True, cache_dir=cache)
    ids = _ids(family)
    merged = llama_logits(tmp_path / "merged" / "model.gguf", ids)
    name = json.loads((tmp_path / "lora" / "manifest.json").read_text())["gguf"]["lora"][adapter.name]["file"]
    applied = llama_logits(tmp_path / "lora" / "model.gguf", ids, lora=tmp_path / "lora" / name)
    plain = llama_logits(tmp_path / "lora" / "model.gguf", ids)
    tolerance = GELU_LORA_TOLERANCE if family in GELU else F32_TOLERANCE
    assert (applied - merged).abs().max().item() <= tolerance
    assert (plain - merged).abs().max().item() > 0.01  # the LoRA does change the logits
    compile_adapter(adapter, base, "gguf", tmp_path / "again", quantize="f32", unmerged=True, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # the base's GGUF was built once, then reused


@pytest.mark.parametrize("module", ["q_a_proj", "kv_b_proj"])
def test_a_gguf_lora_llama_cpp_would_not_apply_is_refused(made, tmp_path, module):
    # llama.cpp's deepseek2 graph multiplies q_a / q_b / kv_a without LoRA; kv_b is split into k_b and v_b
    base, adapter = made("deepseek_v2", target_modules=[module])
    with pytest.raises(UnsupportedError, match=f"{module}: llama.cpp's DEEPSEEK2 graph applies no LoRA"):
        compile_adapter(adapter, base, "gguf", tmp_path / "out", unmerged=True, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_misfit_adapter_is_refused_before_anything_is_written(made, bases, tmp_path):
    _, adapter = made("llama")
    wide = bases("llama", "gguf-wide", hidden_size=64)
    save_tokenizer(wide)
    with pytest.raises(BadInputError, match="does not fit this base"):
        compile_adapter(adapter, wide, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_family_is_refused_in_one_line_naming_it(bases, tmp_path):
    base = bases("opt")
    adapter = make_adapter("opt", base, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="'opt' family"):
        compile_adapter(adapter, base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


_DBRX_FFN = {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}  # builders' tiny DBRX
# Config values llama.cpp's graph (or the gguf target) cannot honour: (family, overrides, the refusal's words)
REFUSED_CONFIGS = [
    ("stablelm", {"qk_layernorm": True}, "qk_layernorm"),
    ("phi", {"qk_layernorm": True}, "qk_layernorm"),
    ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, "no_rope_layers"),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 4}, "sliding-window"),
    ("cohere", {"use_qk_norm": True}, "use_qk_norm"),
    ("cohere2", {"attention_bias": True}, "attention_bias"),
    ("ernie4_5", {"use_bias": True}, "use_bias"),
    ("olmoe", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("mamba", {"pad_vocab_size_multiple": 48}, "pads the vocabulary"),
    # llama.cpp normalizes dt / B / C with the layers' eps: 5e-4 off PEFT on the tiny model if written
    ("falcon_mamba", {"mixer_rms_eps": 1e-6}, "mixer_rms_eps 1e-06 != layer_norm_epsilon 1e-05"),
    # llama.cpp's SmolLM3 graph reads no rope_freqs (the converter writes one for it all the same)
    (
        "smollm3",
        {
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4},
        },
        "llama3",
    ),
    ("falcon", {"alibi": True}, "alibi"),
    ("exaone4", {"sliding_window": None}, "sliding_window"),
    ("olmo2", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("stablelm", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("phi", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("falcon", {"parallel_attn": False}, "parallel_attn"),
    ("hunyuan_v1_dense", {"attention_bias": True}, "attention_bias"),
    ("mamba2", {"time_step_limit": [0.0, 10.0]}, "time_step_limit"),
    ("dots1", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
    ("dbrx", {"ffn_config": _DBRX_FFN | {"moe_normalize_expert_weights": 2.0}}, "expert_weights 2.0"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob True"),
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, "group_limited"),
]


@pytest.mark.parametrize(("family", "overrides", "words"), REFUSED_CONFIGS)
def test_config_values_llama_cpp_cannot_honour_are_refused(made, tmp_path, family, overrides, words):
    import shutil

    base, adapter = made(family)
    edited = shutil.copytree(base, tmp_path / "base")  # the config says it; the check reads only that
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(UnsupportedError, match=words) as info:
        compile_adapter(adapter, edited, "gguf", tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


# The fused qkv's other layouts: Falcon 40B's kv groups with their own attention norm, per-head q, k, v
# in Falcon and GPTBigCode (the tiny defaults are multi-query: q | k | v in blocks)
LAYOUTS = {"falcon-40b": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
           "falcon-headwise": ("falcon", {"multi_query": False}),
           "gpt_bigcode-headwise": ("gpt_bigcode", {"multi_query": False})}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_qkv_layouts_are_regrouped_as_the_converter_does(bases, tmp_path, layout):
    family, overrides = LAYOUTS[layout]
    base = bases(family, f"gguf-{layout}", **overrides)
    _jitter_vectors(base)
    _assert_f32_equals_peft(family, base, tmp_path, GELU_TOLERANCE)


def test_an_untied_command_r_head_is_refused(bases, tmp_path):
    base = bases("cohere", "gguf-untied", tie_word_embeddings=False)
    save_tokenizer(base)
    adapter = make_adapter("cohere", base, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="tie_word_embeddings False"):
        compile_adapter(adapter, base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ernie_moe_without_experts_in_its_last_layers_is_refused(bases, tmp_path):
    # llama.cpp's ERNIE 4.5 MoE graph has experts from the start index to the last layer
    base = bases("ernie4_5_moe", "gguf-end", num_hidden_layers=3, moe_layer_end_index=1)
    save_tokenizer(base)
    adapter = make_adapter("ernie4_5_moe", base, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="moe_layer_end_index 1 with 3 layers"):
        compile_adapter(adapter, base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_on_a_tensor_the_gguf_drops_is_refused(made, tmp_path):
    base, adapter = made("gemma", target_modules=["q_proj", "lm_head"])
    with pytest.raises(UnsupportedError, match="lm_head"):
        compile_adapter(adapter, base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# bf16 / q8_0 weights on this tiny random llama: measured max |diff| 7e-3 / 1.4e-2 against PEFT (logits
# ~0.35); the 4- and 5-bit types are only checked to be written and run (no quality claim on random weights).
QUANTIZED = {"bf16": 3e-2, "q8_0": 5e-2, "q4_0": None, "q5_1": None}


@pytest.mark.parametrize("quantize", QUANTIZED)
def test_quantized_ggufs_hold_the_type_and_run_in_llama_cpp(made, tmp_path, quantize):
    import gguf

    from adaptrix.runtimes.gguf import open_gguf

    base, adapter = made("llama")
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize=quantize)
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == quantize.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay float32, as the converter keeps them
    ids = _ids("llama")
    got = torch.from_numpy(open_gguf(tmp_path / "out").logits([ids])[0])
    expected = peft_logits("llama", base, adapter, {"input_ids": torch.tensor([ids])})[0]
    assert got.shape == expected.shape and torch.isfinite(got).all()
    if QUANTIZED[quantize] is not None:
        assert (got - expected).abs().max().item() <= QUANTIZED[quantize]


def test_a_base_without_tokenizer_json_is_refused_in_one_line(bases, peft_adapters, tmp_path):
    with pytest.raises(UnsupportedError, match=r"no tokenizer\.json"):
        compile_adapter(peft_adapters("llama"), bases("llama"), "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _assert_f32_equals_peft(family: str, base, tmp_path, tolerance: float = F32_TOLERANCE) -> None:
    """The base's f32 GGUF with a seeded adapter merged: llama.cpp's logits equal PEFT's."""
    save_tokenizer(base)
    torch.manual_seed(1)
    adapter = make_adapter(family, base, tmp_path / "adapter")
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="f32")
    ids = _ids(family)
    expected = peft_logits(family, base, adapter, {"input_ids": torch.tensor([ids])})[0]
    assert (llama_logits(tmp_path / "out" / "model.gguf", ids) - expected).abs().max().item() <= tolerance


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}  # fmt: skip


def test_llama3_rope_scaling_is_written_as_the_converters_rope_freqs(bases, tmp_path):
    # theta 5e5 and an original context of 16: of head_dim 8's four frequencies, one is smoothed and
    # three are divided by 8, so a file without rope_freqs would compute other logits
    base = bases("llama", "gguf-llama3", rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0)
    _assert_f32_equals_peft("llama", base, tmp_path)


_YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_yarn_rope_scaling_is_written_as_the_converter_writes_it(bases, tmp_path, family):
    # an original context of 8 and a factor of 4: the frequencies are interpolated and the attention
    # scaled by 1 + 0.1 ln 4, so a file without the YaRN keys computes other logits
    base = bases(family, "gguf-yarn", rope_scaling=_YARN_ROPE, max_position_embeddings=64)
    _assert_f32_equals_peft(family, base, tmp_path)


def test_yarn_with_its_own_attention_factor_is_refused(bases, tmp_path):
    rope = {**_YARN_ROPE, "attention_factor": 1.5}
    base = bases("llama", "gguf-yarn-attention", rope_scaling=rope, max_position_embeddings=64)
    save_tokenizer(base)
    with pytest.raises(UnsupportedError, match="YaRN rope with"):
        compile_adapter(make_adapter("llama", base, tmp_path / "adapter"), base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_phi3_longrope_is_written_as_the_converters_rope_factors(bases, tmp_path):
    # short factors far from 1: a file without them (or with the long ones) computes other logits.
    # llama.cpp picks the long factors when its context (256 at least) passes the original one, and
    # transformers when the sequence does: an original context of 512 keeps both on the short ones.
    probe = json.loads((bases("phi3") / "config.json").read_text())
    half = probe["hidden_size"] // probe["num_attention_heads"] // 2
    rope = {"type": "longrope", "short_factor": [1.0 + i for i in range(half)],
            "long_factor": [3.0 + i for i in range(half)]}  # fmt: skip
    base = bases("phi3", "gguf-longrope", rope_scaling=rope, original_max_position_embeddings=512,
                 max_position_embeddings=2048)  # fmt: skip
    _assert_f32_equals_peft("phi3", base, tmp_path)


def test_tensors_are_merged_at_most_one_ahead_after_the_header_is_written(made, tmp_path, monkeypatch):
    import gguf

    from adaptrix.targets.gguf import model

    base, adapter = made("llama")
    events = []
    value, write_data = model.source_value, gguf.GGUFWriter.write_tensor_data
    write_infos = gguf.GGUFWriter.write_ti_data_to_file
    monkeypatch.setattr(model, "source_value", lambda *a, **k: events.append("value") or value(*a, **k))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                        lambda self, t, *a: events.append("write") or write_data(self, t, *a))  # fmt: skip
    monkeypatch.setattr(gguf.GGUFWriter, "write_ti_data_to_file",
                        lambda self: events.append("infos") or write_infos(self))  # fmt: skip
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="f32")
    assert events[0] == "infos" and events.count("infos") == 1
    rope = events.index("value")  # rope tensors (if any) are written first, computed beforehand
    tensors = events[rope:]
    assert tensors.count("value") == tensors.count("write") > 2
    for index, event in enumerate(tensors):  # merged: at most the tensor being written and the next one
        merged, written = tensors[: index + 1].count("value"), tensors[: index + 1].count("write")
        assert merged - written <= 2, f"{merged} merged, {written} written at event {index}: {event}"


def test_a_lora_on_a_tied_embedding_writes_the_untied_head_as_output_weight(bases, tmp_path):
    import gguf

    base = bases("qwen2", "gguf-tied", tie_word_embeddings=True)
    save_tokenizer(base)
    torch.manual_seed(1)
    adapter = make_adapter("qwen2", base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    assert "output.weight" in names  # the base's embedding; token_embd.weight has the LoRA merged
    ids = _ids("qwen2")
    expected = peft_logits("qwen2", base, adapter, {"input_ids": torch.tensor([ids])})[0]
    assert (llama_logits(tmp_path / "out" / "model.gguf", ids) - expected).abs().max().item() <= F32_TOLERANCE


@pytest.mark.parametrize("prepend", [True, False])  # Llama 2's normalizer prepends "▁", Gemma's does not
def test_a_sentencepiece_style_tokenizer_is_written_as_llama_vocabulary(bases, tmp_path, prepend):
    import gguf
    from gguf_builders import save_sentencepiece_style_tokenizer
    from transformers import AutoTokenizer

    from adaptrix.runtimes.gguf import open_gguf

    base = bases("llama", f"gguf-spm-{prepend}")
    save_sentencepiece_style_tokenizer(base, prepend=prepend)
    torch.manual_seed(1)
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="f32")
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    text = "hi there Bob"
    own = AutoTokenizer.from_pretrained(base)(text)["input_ids"]
    assert open_gguf(tmp_path / "out").tokenize(text) == own  # llama.cpp's SPM tokenizer splits it the same
