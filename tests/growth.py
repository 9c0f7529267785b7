"""Function-preserving growth of a small Llama base: a deeper or a wider model that computes what its
source computes, so an adapter carried onto it by redistribute / project can be checked exactly.
"""

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers as tf


def grow_deeper(
    source_dir: Path, out_dir: Path, positions: Sequence[int], *, depth: int | None = None
) -> Path:
    """Save a deeper Llama computing what `source_dir` computes: source layer i at `positions[i]`.

    Every other layer of `depth` (default max(positions) + 1) is an identity block: a copy of the
    nearest placed layer with its o_proj and down_proj weights zero, so the residual passes through.
    Embeddings, final norm and head are the source's.
    """
    source = tf.LlamaForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    count = source.config.num_hidden_layers
    depth = max(positions) + 1 if depth is None else depth
    if len(positions) != count or list(positions) != sorted(set(positions)) or positions[-1] >= depth:
        raise ValueError(f"positions {list(positions)} must be {count} increasing layers below {depth}")
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = depth
    old = source.state_dict()
    new = {key: value for key, value in old.items() if not key.startswith("model.layers.")}
    for layer in range(depth):
        placed = [i for i, p in enumerate(positions) if p <= layer] or [0]
        i = placed[-1]
        for key, value in old.items():
            prefix = f"model.layers.{i}."
            if key.startswith(prefix):
                name = f"model.layers.{layer}.{key.removeprefix(prefix)}"
                identity = layer not in positions and key.endswith(("o_proj.weight", "down_proj.weight"))
                new[name] = torch.zeros_like(value) if identity else value.clone()
    model = tf.LlamaForCausalLM(config).eval()
    model.load_state_dict(new, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def grow_wider(
    source_dir: Path,
    out_dir: Path,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    *,
    seed: int = 0,
) -> Path:
    """Save a wider Llama computing what `source_dir` computes: old dimensions first, new ones unused.

    New residual dimensions are zero in the embedding and in every o_proj / down_proj row, new heads
    and neurons are appended with zero output weights (their input weights, and every weight reading
    the new residual dimensions, are random: they only ever see zeros or feed zeros). RMSNorm
    weights (and eps) are rescaled by sqrt(hidden_s / hidden), since the mean over the wider
    residual, zero on its new dimensions, is that much smaller. head_dim and the GQA group size stay.
    """
    source = tf.LlamaForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    config = copy.deepcopy(source.config)
    old_hidden, old_heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or old_hidden // old_heads
    if heads // kv_heads != old_heads // config.num_key_value_heads or heads % kv_heads:
        raise ValueError(f"{heads} heads over {kv_heads} kv heads change the GQA group size")
    if hidden < old_hidden or intermediate < config.intermediate_size or heads < old_heads:
        raise ValueError("a wider model cannot be narrower than its source on any dimension")
    ratio = (old_hidden / hidden) ** 0.5
    config.update(dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=config.rms_norm_eps * old_hidden / hidden))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    sizes = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
             "gate_proj": intermediate, "up_proj": intermediate}  # fmt: skip
    new = {}
    for key, value in source.state_dict().items():
        module = key.rsplit(".", 2)[-2]
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            grown = 1 + 0.1 * torch.randn(hidden, generator=generator)
            grown[: len(value)] = value * ratio
        elif module in ("embed_tokens", "o_proj", "down_proj"):
            shapes = {"embed_tokens": (value.shape[0], hidden), "o_proj": (hidden, heads * head_dim)}
            grown = torch.zeros(shapes.get(module, (hidden, intermediate)))
        else:  # readers: q / k / v / gate / up and the head; new rows and columns random
            grown = 0.05 * torch.randn(sizes.get(module, value.shape[0]), hidden, generator=generator)
        if grown.dim() == 2:
            grown[: value.shape[0], : value.shape[1]] = value
        new[key] = grown
    model = tf.LlamaForCausalLM(config).eval()
    model.load_state_dict(new, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
