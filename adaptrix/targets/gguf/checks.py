"""The configs llama.cpp's graphs cannot honour, per family: one-line refusals (families.py uses them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adaptrix.ir.errors import UnsupportedError

__all__ = [
    "both",
    "cohere",
    "dbrx",
    "deepseek",
    "dots1",
    "ernie4_5_moe",
    "ernie_bias",
    "exaone4",
    "falcon",
    "falcon_mamba",
    "full_attention",
    "hunyuan",
    "mamba",
    "mamba2",
    "olmoe",
    "own_head",
    "qk_layernorm",
    "query_scale",
    "router_norm",
    "smollm3_layers",
    "tied",
]


def query_scale(config: dict, path: Path) -> None:
    """llama.cpp scales Gemma 2 / 3 queries by 1/sqrt(head_dim): a config that says otherwise is refused."""
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != config["head_dim"]:
        raise UnsupportedError(
            f"query_pre_attn_scalar {scalar} != head_dim {config['head_dim']}: llama.cpp scales the "
            "queries by 1/sqrt(head_dim) (except for its 27B models)",
            path=path / "config.json",
            fix="use --target merged or hooks",
        )


def router_norm(normalized: bool) -> Callable[[dict, Path], None]:
    """llama.cpp's graph renormalizes the top-k router weights (Qwen3-MoE) or not (Qwen2-MoE), always."""

    def check(config: dict, path: Path) -> None:
        if bool(config.get("norm_topk_prob", normalized)) != normalized:
            raise UnsupportedError(
                f"norm_topk_prob {config.get('norm_topk_prob')}: llama.cpp's graph for this family "
                f"{'always' if normalized else 'never'} renormalizes the routing weights",
                path=path / "config.json",
                fix="use --target merged or hooks",
            )

    return check


def qk_layernorm(config: dict, path: Path) -> None:
    """StableLM's per-head q / k LayerNorms (the converter stacks them); Phi's (none in llama.cpp)."""
    if config.get("qk_layernorm"):
        raise UnsupportedError(f"qk_layernorm: the gguf target does not write {config['model_type']}'s q / k "
                               "norms (StableLM's per-head norms are stacked by llama.cpp's converter; "
                               "llama.cpp's phi2 graph has none)", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def own_head(config: dict, path: Path) -> None:
    """llama.cpp's OLMo 2, StableLM and Phi-2 graphs read a head of their own, which a tied base has not."""
    if config.get("tie_word_embeddings"):
        raise UnsupportedError(f"tie_word_embeddings true: llama.cpp's {config['model_type']} graph reads a "
                               "head of its own (output.weight), which the converter writes from lm_head",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def both(*checks: Callable[[dict, Path], None]) -> Callable[[dict, Path], None]:
    """A check made of several."""

    def check(config: dict, path: Path) -> None:
        for one in checks:
            one(config, path)

    return check


def falcon(config: dict, path: Path) -> None:
    """llama.cpp's Falcon graph: rotary, parallel attention and MLP, no biases in the linear layers."""
    for key, says in (("alibi", True), ("parallel_attn", False), ("bias", True)):
        if bool(config.get(key, not says)) == says:
            raise UnsupportedError(f"{key} {str(says).lower()}: llama.cpp's Falcon graph has rotary "
                                   "positions, parallel attention and MLP and no biases in its linear layers",
                                   path=path / "config.json", fix="use --target merged")  # fmt: skip


def tied(config: dict, path: Path) -> None:
    """llama.cpp's Command-R graphs tie the head to the embedding and have no attention biases."""
    if not config.get("tie_word_embeddings", True) or config.get("attention_bias"):
        raise UnsupportedError(f"tie_word_embeddings {config.get('tie_word_embeddings')}, attention_bias "
                               f"{config.get('attention_bias')}: llama.cpp's {config['model_type']} graph "
                               "ties the head to the embedding and has no attention biases",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def ernie_bias(config: dict, path: Path) -> None:
    """llama.cpp's ERNIE 4.5 graph reads no q / k / v / MLP biases."""
    if config.get("use_bias"):
        raise UnsupportedError("use_bias true: llama.cpp's ERNIE 4.5 graph has no q / k / v or MLP biases",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def ernie4_5_moe(config: dict, path: Path) -> None:
    """llama.cpp's ERNIE 4.5 MoE graph: no biases, experts from the start index to the last layer."""
    ernie_bias(config, path)
    last, n_layers = config.get("moe_layer_end_index", -1), config["num_hidden_layers"]
    if last not in (-1, None) and last < n_layers - 1:
        raise UnsupportedError(f"moe_layer_end_index {last} with {n_layers} layers: llama.cpp's ERNIE 4.5 "
                               "MoE graph has experts up to the last layer", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def full_attention(config: dict, path: Path) -> None:
    """llama.cpp's graph for this family attends over the whole context in every layer."""
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
        raise UnsupportedError(f"sliding-window attention: llama.cpp's {config['model_type']} graph attends "
                               "over the whole context", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def dots1(config: dict, path: Path) -> None:
    """llama.cpp's dots1 graph: a kv head per head, full attention in every layer."""
    full_attention(config, path)
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if n_kv != config["num_attention_heads"]:
        raise UnsupportedError(f"num_key_value_heads {n_kv}: llama.cpp's dots1 graph has a kv head per head "
                               f"({config['num_attention_heads']})", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def cohere(config: dict, path: Path) -> None:
    """llama.cpp's Command-R graph: the head tied, q / k norms exactly in models of 64 layers or more."""
    tied(config, path)
    deep = config["num_hidden_layers"] >= 64
    if bool(config.get("use_qk_norm")) != deep:
        raise UnsupportedError(f"use_qk_norm {config.get('use_qk_norm')} with {config['num_hidden_layers']} "
                               "layers: llama.cpp's Command-R graph has q / k norms exactly in models of 64 "
                               "layers or more", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def olmoe(config: dict, path: Path) -> None:
    """llama.cpp's OLMoE graph: q / k norms as wide as the model (no grouped kv heads), no clip_qkv."""
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if n_kv != config["num_attention_heads"] or config.get("clip_qkv") is not None:
        raise UnsupportedError(f"num_key_value_heads {n_kv}, clip_qkv {config.get('clip_qkv')}: llama.cpp's "
                               "OLMoE graph has a kv head per head and no clamp", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def mamba(config: dict, path: Path) -> None:
    """The converter pads Mamba's vocabulary to pad_vocab_size_multiple and assumes an expansion of 2."""
    pad = config.get("pad_vocab_size_multiple", 8)
    d_model = config["hidden_size"]
    if config["vocab_size"] % pad or (config.get("intermediate_size") or 2 * d_model) != 2 * d_model:
        raise UnsupportedError(f"vocab_size {config['vocab_size']} (pad_vocab_size_multiple {pad}), "
                               f"intermediate_size {config.get('intermediate_size')}: the converter pads the "
                               "vocabulary and writes Mamba with an expansion of 2",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def falcon_mamba(config: dict, path: Path) -> None:
    """llama.cpp normalizes Falcon Mamba's dt / B / C with the layers' RMS eps, not mixer_rms_eps."""
    mamba(config, path)
    mixer = config.get("mixer_rms_eps", 1e-6)  # FalconMambaConfig's default
    layer = config.get("layer_norm_epsilon") or config.get("rms_norm_eps") or 1e-5  # the converter's
    if mixer != layer:
        raise UnsupportedError(f"mixer_rms_eps {mixer} != layer_norm_epsilon {layer}: llama.cpp normalizes "
                               "Falcon Mamba's dt / B / C with the layers' eps", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def hunyuan(config: dict, path: Path) -> None:
    """llama.cpp's HunYuan graphs: no attention biases, one expert count and top-k for every layer."""
    per_layer = [key for key in ("num_experts", "moe_topk") if isinstance(config.get(key), list)]
    if config.get("attention_bias") or per_layer:
        bias = config.get("attention_bias")
        raise UnsupportedError(f"attention_bias {bias}, per-layer {per_layer or 'none'}: llama.cpp's HunYuan "
                               "graphs have no attention biases, one expert count and top-k for all layers",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def deepseek(config: dict, path: Path) -> None:
    """llama.cpp's deepseek2 graph: no attention biases, q_lora_rank outside its lite (26, 27 layers) ones."""
    lite = config["num_hidden_layers"] in (26, 27)
    if config.get("attention_bias") or (config.get("q_lora_rank") is None) != lite:
        raise UnsupportedError(f"attention_bias {config.get('attention_bias')}, q_lora_rank "
                               f"{config.get('q_lora_rank')} with {config['num_hidden_layers']} layers: "
                               "llama.cpp's deepseek2 graph has no attention biases and reads a q_lora_rank "
                               "exactly outside 26- and 27-layer models", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip
    if config["model_type"] != "deepseek_v2":
        return
    method, norm = config.get("topk_method", "greedy"), config.get("norm_topk_prob")
    if method != "greedy" or norm:
        raise UnsupportedError(f"topk_method {method}, norm_topk_prob {norm}: transformers' DeepSeek-V2 gate "
                               "ranks expert groups by their best score, never renormalizes; llama.cpp's by "
                               "the sum of their top two, renormalizing as told", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def dbrx(config: dict, path: Path) -> None:
    """llama.cpp's DBRX graph divides the top-k router weights by their sum (a p-norm of 1)."""
    if (norm := config["ffn_config"].get("moe_normalize_expert_weights", 1)) != 1:
        raise UnsupportedError(f"moe_normalize_expert_weights {norm}: llama.cpp's DBRX graph divides the "
                               "top-k router weights by their sum", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip


def mamba2(config: dict, path: Path) -> None:
    """Mamba 2 as llama.cpp computes it: an unpadded vocabulary, one group, dt unclamped.

    The converter pads the vocabulary to pad_vocab_size_multiple (16 where unset); transformers
    normalizes the gated output over its whole width, llama.cpp per group; llama.cpp has no
    time_step_limit.
    """
    pad = config.get("pad_vocab_size_multiple") or 16
    low, high = config.get("time_step_limit") or (0.0, 1e30)
    groups = config.get("n_groups") or 1
    if config["vocab_size"] % pad or groups != 1 or low > 0 or high < 1e3:
        raise UnsupportedError(f"vocab_size {config['vocab_size']} (pad_vocab_size_multiple {pad}), n_groups "
                               f"{groups}, time_step_limit {[low, high]}: the converter pads the vocabulary; "
                               "llama.cpp normalizes the gated output per group where transformers does over "
                               "its whole width, and clamps no dt (a limit below 1e3 may bite)",
                               path=path / "config.json", fix="use --target merged")  # fmt: skip


def exaone4(config: dict, path: Path) -> None:
    """llama.cpp's EXAONE 4 graph: sliding windows, rope-less global layers exactly in 64-layer models."""
    n_layers, window = config["num_hidden_layers"], config.get("sliding_window")
    if (n_layers == 64) != (window is not None):
        raise UnsupportedError(f"sliding_window {window} with {n_layers} layers: llama.cpp's EXAONE 4 graph "
                               "has sliding windows and rope-less global layers exactly in 64-layer models "
                               "(the 32B)", path=path / "config.json", fix="use --target merged")  # fmt: skip


def smollm3_layers(config: dict, path: Path) -> None:
    """llama.cpp's SmolLM3 graph: rope in every layer but each fourth, full attention everywhere."""
    n_layers = config["num_hidden_layers"]
    expected = [int((layer + 1) % 4 != 0) for layer in range(n_layers)]
    if (rope := config.get("no_rope_layers")) is not None and list(rope) != expected:
        raise UnsupportedError(f"no_rope_layers {rope}: llama.cpp's SmolLM3 graph leaves out rope in every "
                               f"fourth layer only ({expected})", path=path / "config.json",
                               fix="use --target merged")  # fmt: skip
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
        raise UnsupportedError("sliding-window attention: llama.cpp's SmolLM3 graph attends over the whole "
                               "context", path=path / "config.json", fix="use --target merged")  # fmt: skip
