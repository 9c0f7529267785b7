"""Tiny seeded models of every text family in transformers' LM auto mappings, for the coverage sweep.

`tiny_model(model_type, mapping, seed)` builds one from the family's own config class (never remote
code, never a download): the config's defaults with the common size names shrunk (hidden 32, 2
layers, 4 heads, 2 kv heads, vocab 128, ...) plus a small per-family table where that is not enough.
Families that are not text models, or that are only a wrapper of other families, are in SKIPPED.
"""

from __future__ import annotations

import torch
import transformers as tf
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

__all__ = [
    "AUTO_CLASSES",
    "BROKEN",
    "MAPPINGS",
    "SKIPPED",
    "VOCAB",
    "all_cases",
    "auto_class",
    "sample_inputs",
    "tiny_config",
    "tiny_model",
]

VOCAB = 128
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, POSITIONS, EXPERTS = 32, 64, 2, 4, 2, 8, 64, 4

MAPPINGS = {
    "causal": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "masked": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
}
AUTO_CLASSES = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "masked": "AutoModelForMaskedLM",
}

_KV_NAMES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads", "multi_query_group_num")
# The common size names of transformers' configs, by what they size.
_SIZES: dict[tuple[str, ...], int] = {
    ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "emb_dim", "d_embed",
     "embedding_size", "word_embed_proj_dim"): HIDDEN,
    ("intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
     "hidden_dim", "d_inner", "dff", "ffn_hidden_size", "intermediate_ffn_size"): FFN,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"): FFN // 2,
    ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers", "n_layers",
     "num_decoder_layers", "num_encoder_layers"): LAYERS,
    ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
     "decoder_attention_heads", "n_heads", "num_decoder_attention_heads"): HEADS,
    _KV_NAMES: KV_HEADS,
    ("head_dim", "d_kv", "d_head", "attention_head_dim", "kv_channels"): HEAD_DIM,
    ("vocab_size", "src_vocab_size", "tgt_vocab_size"): VOCAB,
    ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_source_positions",
     "max_target_positions"): POSITIONS,
    ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"): EXPERTS,
    ("num_experts_per_tok", "moe_top_k", "moe_k", "moe_topk"): 2,
    ("rotary_dim",): HEAD_DIM // 2,
    ("n_shared_experts",): 1,
}  # fmt: skip
_GENERIC = {name: value for names, value in _SIZES.items() for name in names}
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")

_MAMBA_HYBRID = {
    "mamba_n_heads": HEADS,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_d_state": 8,
    "mamba_chunk_size": 8,
}
# Where the generic sizes are not enough: keys set after them (a dict value is merged into a sub-dict).
OVERRIDES: dict[str, dict] = {
    "mobilebert": {"embedding_size": 16},  # its LM head dense has hidden - embedding rows
    "big_bird": {"attention_type": "original_full"},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "longformer": {"attention_window": 4},
    "led": {"attention_window": 4, "max_encoder_position_embeddings": POSITIONS,
            "max_decoder_position_embeddings": POSITIONS},
    "funnel": {"block_sizes": [1, 1], "block_repeats": [1, 1]},
    "mamba": {"state_size": 8, "time_step_rank": 4},
    "falcon_mamba": {"state_size": 8, "time_step_rank": 4},
    "bamba": _MAMBA_HYBRID,
    "granitemoehybrid": {**_MAMBA_HYBRID, "layer_types": ["mamba", "attention"],
                         "shared_intermediate_size": 32},
    "nemotron": {"num_key_value_heads": KV_HEADS},
    "qwen3_next": {"linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4},
    "falcon_h1": {**_MAMBA_HYBRID, "mamba_d_ssm": 64, "mamba_chunk_size": 8},
    "jamba": {"use_mamba_kernels": False, "mamba_d_state": 8, "attn_layer_offset": 1, "attn_layer_period": 2,
              "expert_layer_offset": 1, "expert_layer_period": 2},
    "zamba": {"use_mamba_kernels": False, "mamba_d_state": 8, "attn_layer_offset": 1, "attn_layer_period": 2,
              "n_mamba_heads": 2},
    "zamba2": {"use_mem_rope": False, "mamba_d_state": 8, "mamba_headdim": 8,
               "layers_block_type": ["mamba", "hybrid"], "hybrid_layer_ids": [1]},
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"], "num_kv_shared_layers": 0,
                     "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB,
                     "laurel_rank": 4, "altup_num_inputs": 2},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "longcat_flash": {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                      "qk_head_dim": 8, "head_dim": 4, "v_head_dim": 8, "zero_expert_num": 2,
                      "expert_ffn_hidden_size": 32},
    "xlstm": {"embedding_dim": HIDDEN, "num_heads": HEADS, "qk_dim_factor": 1.0, "chunk_size": 4},
    "esm": {"pad_token_id": 1, "mask_token_id": 2, "position_embedding_type": "absolute"},
    "mamba2": {"head_dim": 16, "n_groups": 1, "state_size": 8, "time_step_rank": 4},
    "rwkv": {"attention_hidden_size": HIDDEN, "context_length": POSITIONS},
    "deepseek_v2": {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                    "n_shared_experts": 1},
    "deepseek_v3": {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                    "n_shared_experts": 1, "head_dim": 4, "qk_head_dim": 8},
    "blt": {"encoder_config": {"hidden_size_global": HIDDEN},
            "decoder_config": {"hidden_size_global": HIDDEN},
            "global_config": {"encoder_cross_output_size": HIDDEN}, "encoder_hash_byte_group_vocab": 64},
    "transfo-xl": {"cutoffs": [64], "div_val": 1},
    "reformer": {"axial_pos_shape": [8, 8], "axial_pos_embds_dim": [16, 16], "attn_layers": ["local", "lsh"],
                 "attention_head_size": HEAD_DIM, "num_buckets": 4},
    "gptsan-japanese": {"num_switch_layers": 1, "num_ext_layers": 1},
    "xlm-prophetnet": {"ngram": 2},
    "prophetnet": {"ngram": 2},
    "switch_transformers": {"num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1},
    "nllb-moe": {"encoder_sparse_step": 2, "decoder_sparse_step": 2},
}  # fmt: skip

# Families whose sub-configs refuse the common keys a shrunk to_dict() carries: given whole instead.
WHOLE: dict[str, dict] = {
    "dbrx": {"d_model": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS, "max_seq_len": POSITIONS,
             "vocab_size": VOCAB, "attn_config": {"kv_n_heads": KV_HEADS},
             "ffn_config": {"ffn_hidden_size": FFN, "moe_num_experts": EXPERTS, "moe_top_k": 2}},
}  # fmt: skip

# Families whose tiny model does not run today (transformers 4.57), each with what it raises; the full
# sweep fails on a build failure not listed here, so that no family drops out of the coverage unseen.
BROKEN: dict[str, str] = {
    "transfo-xl": "deprecated; its forward calls type_as() without an argument",
    "fsmt": "FSMTDecoder has no attribute 'config' (its forward builds a DynamicCache(config=self.config))",
    "xlstm": "its chunkwise kernel mixes qk and v head sizes at this tiny size (no override found yet)",
}

# Not text models (their LM class takes images or audio), or only a wrapper of other families.
SKIPPED: dict[str, str] = {
    **dict.fromkeys(("emu3", "fuyu", "gemma3", "gemma3n", "git", "got_ocr2", "llama4", "mllama",
                     "phi4_multimodal", "trocr"), "not a text model (vision)"),
    **dict.fromkeys(("moshi", "musicgen", "musicgen_melody", "speech_to_text_2", "whisper",
                     "granite_speech", "qwen2_audio", "seamless_m4t", "seamless_m4t_v2", "voxtral",
                     "wav2vec2"), "not a text model (audio)"),
    "encoder-decoder": "a wrapper of two other families (their own rows cover them)",
}  # fmt: skip


_NO_DECODER_IDS = {"gptsan-japanese"}  # a prefix LM in the seq2seq mapping: one sequence in


def all_cases() -> list[tuple[str, str]]:
    """Every (model_type, mapping) of the three auto mappings, in mapping then name order."""
    return [(model_type, mapping) for mapping, names in MAPPINGS.items() for model_type in names]


def auto_class(mapping: str) -> type:
    """The transformers auto class that loads a model of `mapping`."""
    return getattr(tf, AUTO_CLASSES[mapping])


def _shrink(values: dict) -> dict:
    """The config dict with every known size name shrunk, lists per layer cut to LAYERS, sub-dicts too."""
    layers = next((values[k] for k in _LAYER_COUNTS if isinstance(values.get(k), int)), None)
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("id2label", "label2id", "rope_scaling"):
            out[key] = _shrink(value)
        elif key in _GENERIC and _sized(key, value):
            out[key] = [_GENERIC[key]] * LAYERS if isinstance(value, list) else _GENERIC[key]
        elif isinstance(value, list) and layers and len(value) == layers and layers > LAYERS:
            out[key] = value[-LAYERS:]  # the last ones: a pattern ends with its rarer kind (full attention)
        elif key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = 2  # a special id inside the tiny vocab (eos-like; inputs draw ids 3..VOCAB-1)
        else:
            out[key] = value
    return out


def _sized(key: str, value: object) -> bool:
    """Whether a generic size replaces `value`: an int, a per-layer list of ints, or an unset size."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(each, int) for each in value)
    if value is None:
        return key not in _KV_NAMES  # an unset kv-head count means one per head: it stays unset
    return isinstance(value, int) and not isinstance(value, bool)


def _merge(values: dict, extra: dict) -> dict:
    """`values` with `extra` set on top (a dict value merged into the sub-dict it names)."""
    out = dict(values)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def tiny_config(model_type: str) -> tf.PretrainedConfig:
    """The family's config with its defaults shrunk to a tiny model."""
    config_class = CONFIG_MAPPING[model_type]
    if model_type in WHOLE:
        return config_class(**WHOLE[model_type])
    values = _merge(_shrink(config_class().to_dict()), OVERRIDES.get(model_type, {}))
    values.pop("transformers_version", None)
    return config_class.from_dict(values)


def tiny_model(model_type: str, mapping: str, seed: int = 0) -> torch.nn.Module:
    """A tiny seeded random model of `model_type` built by `mapping`'s auto class, float32, eval mode."""
    if model_type in SKIPPED:
        raise ValueError(f"{model_type} is skipped: {SKIPPED[model_type]}")
    config = tiny_config(model_type)
    config.is_decoder = mapping == "causal"  # an encoder family's causal LM asks for it (reformer checks)
    if mapping == "causal" and getattr(config, "bidirectional", False):
        config.bidirectional = False  # MEGA's causal LM needs its one-way EMA
    torch.manual_seed(seed)
    return auto_class(mapping).from_config(config, torch_dtype=torch.float32).float().eval()


def sample_inputs(model_type: str, mapping: str, seed: int = 2, batch: int = 2, length: int = 8) -> dict:
    """Seeded inputs: token ids 3..VOCAB-1 (and decoder ids for seq2seq, and what a family needs besides)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}
    if mapping == "seq2seq" and model_type not in _NO_DECODER_IDS:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length - 3), generator=generator)
    if model_type == "xmod":
        inputs["lang_ids"] = torch.zeros(batch, dtype=torch.long)  # X-MOD picks its language adapter by id
    return inputs
