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
