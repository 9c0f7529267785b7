"""Tiny seeded models of every family, PEFT adapters for them, and PEFT's reference forward."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

VOCAB = 128
FP32_TOLERANCE = 1e-4  # max |diff| of logits, merged vs PEFT, float32 (the bound)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one family and what LoRA usually targets there."""

    config: type
    model: type
    config_kwargs: dict
    targets: tuple[str, ...]
    encoder: bool = False
    token_types: bool = True  # whether the encoder's forward takes token_type_ids
    seq2seq: bool = False  # an encoder-decoder: its forward takes decoder_input_ids too
    # Modules with a weight that the family's role table leaves to the module-tree binder: patterns
    # (re.fullmatch) of the key inside a layer, or of the full name outside the layers.
    unnamed: tuple[str, ...] = ()


_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
)  # fmt: skip
_ENCODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
)  # fmt: skip
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_QK_NORM = r"self_attn\.[qk]_norm"
_POST_NORMS = r"post_(attention|feedforward)_layernorm"
_GEMMA_NORMS = (r"\w+_layernorm", r"model\.norm")  # (1 + weight) RMSNorms: see binders/gemma.py
# head_dim 16, not hidden / heads = 8, as in Gemma 7B and Qwen3: the config's head_dim must be read
# (Qwen2-MoE refuses it).
_MOE = dict(_DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_DEEPSEEK = dict(
    _DECODER,
    num_key_value_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=1.5,
)
_MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_GPT2_LIKE = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)

_T5 = dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB)
# transformers 5 keeps the stacks' own names of `shared` (encoder.embed_tokens, decoder.embed_tokens)
_T5_UNNAMED = (r"(en|de)coder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias",
               r"encoder\.final_layer_norm", r"(en|de)coder\.embed_tokens")  # fmt: skip

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        tf.GPT2Config, tf.GPT2LMHeadModel,
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
        ("c_attn", "c_proj", "c_fc"),
    ),
    "llama": Family(tf.LlamaConfig, tf.LlamaForCausalLM, _DECODER, _LLAMA_TARGETS),
    "mistral": Family(tf.MistralConfig, tf.MistralForCausalLM, _DECODER, _LLAMA_TARGETS),
    "qwen2": Family(tf.Qwen2Config, tf.Qwen2ForCausalLM, _DECODER, _LLAMA_TARGETS),
    "gpt_neox": Family(
        tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
        {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"},
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    "phi3": Family(
        tf.Phi3Config, tf.Phi3ForCausalLM,
        dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
    "bert": Family(
        tf.BertConfig, tf.BertForSequenceClassification, _ENCODER,
        ("query", "key", "value", "dense"), encoder=True,
    ),
    "roberta": Family(
        tf.RobertaConfig, tf.RobertaForSequenceClassification,
        dict(_ENCODER, pad_token_id=1), ("query", "key", "value", "dense"), encoder=True,
    ),
    "gemma": Family(
        tf.GemmaConfig, tf.GemmaForCausalLM, dict(_DECODER, head_dim=16), _LLAMA_TARGETS, unnamed=_GEMMA_NORMS
    ),
    "gemma2": Family(
        tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(_DECODER, head_dim=16), _LLAMA_TARGETS,
        unnamed=_GEMMA_NORMS,
    ),
    "gemma3_text": Family(
        tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(_DECODER, head_dim=16), _LLAMA_TARGETS,
        unnamed=(*_GEMMA_NORMS, _QK_NORM),
    ),
    "qwen3": Family(
        tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(_DECODER, head_dim=16), _LLAMA_TARGETS, unnamed=(_QK_NORM,)
    ),
    "qwen2_moe": Family(
        tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(_MOE, head_dim=8, shared_expert_intermediate_size=32),
        _ATTENTION, unnamed=(r"mlp\..+",),
    ),
    "qwen3_moe": Family(
        tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, _MOE, _ATTENTION, unnamed=(r"mlp\..+", _QK_NORM)
    ),
    "mixtral": Family(
        tf.MixtralConfig, tf.MixtralForCausalLM, dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
        _ATTENTION, unnamed=(r"block_sparse_moe\..+",),
    ),
    "phi": Family(
        tf.PhiConfig, tf.PhiForCausalLM, _DECODER, ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    ),
    "olmo": Family(tf.OlmoConfig, tf.OlmoForCausalLM, _DECODER, _LLAMA_TARGETS),
    "olmo2": Family(
        tf.Olmo2Config, tf.Olmo2ForCausalLM, _DECODER, _LLAMA_TARGETS, unnamed=(_POST_NORMS, _QK_NORM)
    ),
    "granite": Family(tf.GraniteConfig, tf.GraniteForCausalLM, _DECODER, _LLAMA_TARGETS),
    "stablelm": Family(tf.StableLmConfig, tf.StableLmForCausalLM, _DECODER, _LLAMA_TARGETS),
    "starcoder2": Family(
        tf.Starcoder2Config, tf.Starcoder2ForCausalLM, _DECODER, (*_ATTENTION, "c_fc", "c_proj")
    ),
    "falcon": Family(
        tf.FalconConfig, tf.FalconForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    "gptj": Family(
        tf.GPTJConfig, tf.GPTJForCausalLM, dict(_GPT2_LIKE, rotary_dim=4),
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    ),
    "opt": Family(
        tf.OPTConfig, tf.OPTForCausalLM,
        dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64, word_embed_proj_dim=32),
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    ),
    "bloom": Family(
        tf.BloomConfig, tf.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    "gpt_bigcode": Family(
        tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, _GPT2_LIKE, ("c_attn", "c_proj", "c_fc"),
    ),
    "cohere": Family(tf.CohereConfig, tf.CohereForCausalLM, _DECODER, _LLAMA_TARGETS),
    "smollm3": Family(
        tf.SmolLM3Config, tf.SmolLM3ForCausalLM,
        dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2), _LLAMA_TARGETS,
    ),
    # Families the generic (module-tree) binder compiles; here for the gguf target's parity tests
    "olmo3": Family(
        tf.Olmo3Config, tf.Olmo3ForCausalLM, _DECODER, _LLAMA_TARGETS, unnamed=(_POST_NORMS, _QK_NORM)
    ),
    "arcee": Family(tf.ArceeConfig, tf.ArceeForCausalLM, _DECODER, (*_ATTENTION, "up_proj", "down_proj")),
    "seed_oss": Family(tf.SeedOssConfig, tf.SeedOssForCausalLM, dict(_DECODER, head_dim=8), _LLAMA_TARGETS),
    "exaone4": Family(
        tf.Exaone4Config, tf.Exaone4ForCausalLM, _DECODER, _LLAMA_TARGETS, unnamed=(_POST_NORMS, _QK_NORM)
    ),
    "cohere2": Family(tf.Cohere2Config, tf.Cohere2ForCausalLM, _DECODER, _LLAMA_TARGETS),
    "glm4": Family(
        tf.Glm4Config, tf.Glm4ForCausalLM, dict(_DECODER, head_dim=8, pad_token_id=0),
        (*_ATTENTION, "gate_up_proj", "down_proj"),
    ),
    "ernie4_5": Family(
        tf.Ernie4_5Config, tf.Ernie4_5ForCausalLM, dict(_DECODER, head_dim=8), _LLAMA_TARGETS
    ),
    "nemotron": Family(
        tf.NemotronConfig, tf.NemotronForCausalLM, _DECODER, (*_ATTENTION, "up_proj", "down_proj")
    ),
    "olmoe": Family(
        tf.OlmoeConfig, tf.OlmoeForCausalLM,
        dict(_DECODER, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, intermediate_size=16),
        _ATTENTION, unnamed=(r"mlp\..+", _QK_NORM),
    ),
    "glm": Family(
        tf.GlmConfig, tf.GlmForCausalLM, dict(_DECODER, head_dim=8, pad_token_id=0),
        (*_ATTENTION, "gate_up_proj", "down_proj"),
    ),
    "mamba": Family(
        tf.MambaConfig, tf.MambaForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, state_size=8),
        ("in_proj", "x_proj"),  # PEFT refuses conv1d and out_proj on Mamba
    ),
    # mixer_rms_eps as the layers' eps: llama.cpp normalizes dt / B / C with that (gguf target)
    "falcon_mamba": Family(
        tf.FalconMambaConfig, tf.FalconMambaForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, state_size=8, mixer_rms_eps=1e-5),
        ("in_proj", "x_proj"),
    ),
    "hunyuan_v1_dense": Family(
        tf.HunYuanDenseV1Config, tf.HunYuanDenseV1ForCausalLM, dict(_DECODER, head_dim=8), _LLAMA_TARGETS
    ),
    "hunyuan_v1_moe": Family(
        tf.HunYuanMoEV1Config, tf.HunYuanMoEV1ForCausalLM,
        dict(_DECODER, head_dim=8, intermediate_size=16, num_experts=4, moe_topk=2), _ATTENTION,
    ),
    # MLA (q and kv low-rank, rope on 4 of each head's 12 key dims), a dense first layer, then experts
    "deepseek_v2": Family(
        tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, _DEEPSEEK, (*_MLA, "o_proj"),
    ),
    # the same with V3's router: sigmoid, a correction bias, 2 groups of 2 experts (1 chosen), renormalized
    "deepseek_v3": Family(
        tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(_DEEPSEEK, n_group=2, topk_group=1),
        (*_MLA, "o_proj"),
    ),
    "dbrx": Family(
        tf.DbrxConfig, tf.DbrxForCausalLM,
        dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
             attn_config=dict(kv_n_heads=2, clip_qkv=0.1, rope_theta=10000.0),
             ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2)),
        ("Wqkv", "out_proj"),
    ),
    # Mamba layers 0 and 2 with a dense MLP, attention layers 1 and 3 with experts
    "jamba": Family(
        tf.JambaConfig, tf.JambaForCausalLM,
        dict(_DECODER, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
             expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
             mamba_d_state=8, mamba_dt_rank=4),
        (*_ATTENTION, "in_proj", "x_proj"),
    ),
    # a dense first layer, then 4 experts and a shared one
    "ernie4_5_moe": Family(
        tf.Ernie4_5_MoeConfig, tf.Ernie4_5_MoeForCausalLM,
        dict(_DECODER, head_dim=8, moe_intermediate_size=16, moe_num_experts=4, moe_k=2,
             moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=1, moe_layer_interval=1),
        _LLAMA_TARGETS,
    ),
    # a dense first layer, then a sigmoid router with a correction bias over 2 groups of 2 experts
    "dots1": Family(
        tf.Dots1Config, tf.Dots1ForCausalLM,
        dict(_DECODER, num_key_value_heads=4, head_dim=8, n_routed_experts=4, n_shared_experts=1,
             num_experts_per_tok=2,
             moe_intermediate_size=16, first_k_dense_replace=1, norm_topk_prob=True, n_group=2, topk_group=1,
             routed_scaling_factor=1.5),
        _LLAMA_TARGETS,
    ),
    # a dense first layer, then a sigmoid router over 2 groups of 2 experts; half of each head rotated
    "glm4_moe": Family(
        tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM,
        dict(_DECODER, head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
             moe_intermediate_size=16, first_k_dense_replace=1, n_group=2, topk_group=1,
             routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True),
        _LLAMA_TARGETS,
    ),
    # 4 heads of 16, state 8; a finite time_step_limit (Adaptrix reads no Infinity in config.json)
    "mamba2": Family(
        tf.Mamba2Config, tf.Mamba2ForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, state_size=8, num_heads=4, head_dim=16,
             n_groups=1, expand=2, chunk_size=4, time_step_limit=(0.0, 1e9)),
        ("in_proj",),
    ),
    "granitemoe": Family(
        tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM,
        dict(_DECODER, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2), _ATTENTION,
    ),
    "granitemoeshared": Family(
        tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM,
        dict(_DECODER, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
             shared_intermediate_size=24),
        _ATTENTION,
    ),
    "lfm2": Family(
        tf.Lfm2Config, tf.Lfm2ForCausalLM,
        dict(_DECODER, layer_types=["conv", "full_attention", "conv", "full_attention"], num_hidden_layers=4,
             block_multiple_of=32),
        ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"),
    ),
    "apertus": Family(
        tf.ApertusConfig, tf.ApertusForCausalLM,
        # llama3 rope (Apertus' own) with an original context of 16: three of four frequencies scaled
        dict(_DECODER, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
             "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        (*_ATTENTION, "up_proj", "down_proj"),
    ),
    "mpt": Family(
        tf.MptConfig, tf.MptForCausalLM,
        dict(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64),
        ("Wqkv", "out_proj", "up_proj", "down_proj"),
    ),
    # DeBERTa-v3's layout: relative attention, no absolute positions.
    "deberta-v2": Family(
        tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification,
        dict(_ENCODER, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
             norm_rel_ebd="layer_norm", position_buckets=8, max_relative_positions=-1, share_att_key=True),
        ("query_proj", "key_proj", "value_proj", "dense"), encoder=True,
        unnamed=(r"deberta\.encoder\.(rel_embeddings|LayerNorm)",),
    ),
    "modernbert": Family(
        tf.ModernBertConfig, tf.ModernBertForSequenceClassification,
        dict(_ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
             global_attn_every_n_layers=2, local_attention=16),
        ("Wqkv", "Wo", "Wi", "dense"), encoder=True, token_types=False, unnamed=(r"head\.norm",),
    ),
    # Encoder-decoders (binders/t5.py, binders/bart.py): 2 encoder + 2 decoder layers; mT5 is gated
    # (wi_0 / wi_1) with an attention width num_heads * d_kv = 16 != d_model and 3 decoder layers.
    "t5": Family(
        tf.T5Config, tf.T5ForConditionalGeneration, _T5, (*"qkvo", "wi", "wo"), seq2seq=True,
        unnamed=_T5_UNNAMED,
    ),
    "mt5": Family(
        tf.MT5Config, tf.MT5ForConditionalGeneration,
        dict(_T5, d_kv=4, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        (*"qkvo", "wi_0", "wi_1", "wo"), seq2seq=True, unnamed=_T5_UNNAMED,
    ),
    "bart": Family(
        tf.BartConfig, tf.BartForConditionalGeneration,
        dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
             max_position_embeddings=64),
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), seq2seq=True,
        # (the stacks' embed_tokens are modules of their own whose weight is shared's)
        unnamed=(r"model\.encoder\.(embed_positions|layernorm_embedding)",
                 r"model\.(en|de)coder\.embed_tokens"),
    ),
}  # fmt: skip
# The families of the first role tables, which the ONNX and CUDA tests cover.
ONNX_FAMILIES = ("bert", "gpt2", "gpt_neox", "llama", "mistral", "phi3", "qwen2", "roberta")


# transformers 5 keeps MoE experts packed in 3-D parameters and renames them on load, while the
# checkpoint stores them one by one (adaptrix.binders.packed).
TRANSFORMERS_5 = int(tf.__version__.split(".")[0]) >= 5
MOE = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"})
# Families whose bases Adaptrix compiles only with transformers 4.57 (it refuses them under 5, in one line)
TRANSFORMERS_4_ONLY = {
    "granitemoe": "transformers 5 loads GraniteMoE's fused experts under other names than the checkpoint's "
    "(block_sparse_moe.input_linear): Adaptrix compiles these bases with transformers 4.57",
    "granitemoeshared": "transformers 5 loads GraniteMoeShared's fused experts under other names than the "
    "checkpoint's (block_sparse_moe.input_linear): Adaptrix compiles these bases with transformers 4.57",
    "jamba": "transformers 5 packs Jamba's experts on load, under other names than the checkpoint's "
    "(feed_forward.experts.N): Adaptrix compiles these bases with transformers 4.57",
}


def build_base(
    family: str, path: Path, *, seed: int = 0, dtype=torch.float32, shard: str | None = None, **overrides
) -> Path:
    """Save a seeded random base of `family` into `path`."""
    if TRANSFORMERS_5 and family in TRANSFORMERS_4_ONLY:
        pytest.skip(TRANSFORMERS_4_ONLY[family])
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    config = spec.config(**{**spec.config_kwargs, **overrides})
    model = spec.model(config).eval().to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def load_model(family: str, path: Path, dtype=torch.float32):
    """Load a saved model of `family` in eval mode."""
    model = FAMILIES[family].model.from_pretrained(path, dtype=dtype).eval()
    # transformers 4.57 keeps Apertus' xIELU parameters in bfloat16 whatever the model's dtype (its softplus
    # too); 5 keeps them in the model's. As 5 does: the tests' bases store bfloat16-exact values there.
    for module in model.modules():
        if type(module).__name__ == "XIELUActivation":
            module.to(dtype)
    return model


def make_adapter(
    family: str,
    base: Path,
    path: Path,
    *,
    seed: int = 1,
    safe: bool = True,
    save_embedding_layers: bool | str = "auto",
    **lora_kwargs,
) -> Path:
    """Make a PEFT LoRA adapter for `base` with non-zero weights and save it into `path`.

    Everything PEFT would train besides LoRA (biases, DoRA magnitudes, modules_to_save copies)
    is perturbed too, as training would, so that a compiler that ignored it would fail.
    """
    model = load_model(family, base)
    lora_kwargs.setdefault("target_modules", list(FAMILIES[family].targets))
    config = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **lora_kwargs})
    with torch.random.fork_rng():  # PEFT draws A and B from torch's global generator: seeded here, so
        torch.manual_seed(seed)  # an adapter does not depend on which tests ran before it
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            is_lora = any(part in name for part in ("lora_A", "lora_B", "lora_embedding"))
            if param.requires_grad and not is_lora:
                noise = torch.randn(param.shape, generator=generator)
                param.mul_(1 + 0.2 * noise) if "magnitude" in name else param.add_(0.1 * noise)
    peft_model.save_pretrained(path, safe_serialization=safe, save_embedding_layers=save_embedding_layers)
    return path


def pair_of(adapters, family: str, **lora) -> tuple[Path, Path]:
    """Two LoRA adapters from conftest's `peft_adapters`: ranks 4 and 2 (full rank 6), `lora` on both."""
    return adapters(family, **lora), adapters(family, seed=5, r=2, lora_alpha=3, **lora)


def prompts_file(
    path: Path, count: int, *, length: int = 6, high: int = VOCAB, seed: int = 3
) -> torch.Tensor:
    """Seeded prompts [count, length] of ids 3..high-1, also written to `path` as JSON token-id lists."""
    prompts = torch.randint(3, high, (count, length), generator=torch.Generator().manual_seed(seed))
    path.write_text(json.dumps(prompts.tolist()))
    return prompts


def sample_inputs(family: str, seed: int = 2, batch: int = 2, length: int = 9) -> dict:
    """Seeded model inputs (token ids, a mask and token types for encoders, decoder ids for seq2seq)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    if FAMILIES[family].seq2seq:
        return {"input_ids": ids, "decoder_input_ids": ids[:, : length - 3]}
    if not FAMILIES[family].encoder:
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    if not FAMILIES[family].token_types:
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@torch.no_grad()
def peft_logits(family: str, base: Path, adapter: Path, inputs: dict) -> torch.Tensor:
    """The reference: PEFT's own forward with the adapter loaded from disk, unmerged."""
    model = PeftModel.from_pretrained(load_model(family, base), adapter).eval()
    return model(**inputs).logits


@torch.no_grad()
def model_logits(family: str, path: Path, inputs: dict, dtype=torch.float32) -> torch.Tensor:
    """Logits of a saved model directory, loaded with transformers."""
    return load_model(family, path, dtype)(**inputs).logits


ONNX_EXPORT_MISSING = 'ONNX export needs optimum-onnx: pip install "adaptrix[onnx]" (transformers < 4.58)'


def exports_onnx() -> bool:
    """Whether optimum's ONNX exporter (the `onnx` extra) is installed; the transformers 5 job has none."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ImportError:  # optimum itself is missing
        return False


def needs_onnx_export() -> None:
    """Skip the calling test or fixture where optimum's ONNX exporter is not installed."""
    if not exports_onnx():
        pytest.skip(ONNX_EXPORT_MISSING)
