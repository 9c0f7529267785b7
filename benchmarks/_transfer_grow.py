"""Function-preserving growth of a Llama base: a deeper and a wider model that compute what it computes.

- deeper: the source's layer i becomes layer 2i; each inserted layer 2i+1 is a copy of layer i with
  o_proj and down_proj zeroed, so it adds nothing to the residual stream (an identity block);
- wider: hidden, heads, kv heads and intermediate grow with head_dim kept. The old weights sit in
  the leading block of each matrix. Every new residual dimension is zero in the embedding and
  in the rows of o_proj / down_proj, so it stays zero through the model; new heads and neurons
  get random input weights and zero output weights. RMSNorm divides by the mean square over all
  hidden dims, so the norm weights are scaled by sqrt(hidden_s / hidden_t) and eps by
  hidden_s / hidden_t: the old dims come out exactly as before. Query heads stay grouped onto
  kv heads as before (heads / kv heads is kept), the old heads first.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def grow_deeper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer i -> 2i, an identity copy of it at 2i+1."""
    grown = {}
    for name, value in state.items():
        match = _LAYER.fullmatch(name)
        if match is None:
            grown[name] = value.clone()
            continue
        layer, rest = int(match[1]), match[2]
        grown[f"model.layers.{2 * layer}.{rest}"] = value.clone()
        grown[f"model.layers.{2 * layer + 1}.{rest}"] = (
            torch.zeros_like(value) if rest in _OUTPUTS else value.clone()
        )
    return grown


def grow_wider(
    state: dict[str, torch.Tensor], source: dict, target: dict, seed: int
) -> dict[str, torch.Tensor]:
    """The source's weights embedded in the target's shapes (configs as dicts)."""
    gen = torch.Generator().manual_seed(seed)
    hs, ht = source["hidden_size"], target["hidden_size"]
    norm_scale = math.sqrt(hs / ht)
    grown = {}
    for name, value in state.items():
        if name.endswith("norm.weight"):
            grown[name] = torch.cat([value, value.mean().expand(ht - hs)]) * norm_scale
            continue
        shape = _target_shape(name, value.shape, target)
        out_zero = name.endswith(_OUTPUTS) or name == "model.embed_tokens.weight"
        grown[name] = _embed(value, shape, gen, zero_rest=out_zero)
    return grown


def _target_shape(name: str, shape: torch.Size, target: dict) -> tuple[int, ...]:
    """The shape a weight has in the target config."""
    hidden, inner = target["hidden_size"], target["intermediate_size"]
    heads, kv_heads = (
        target[key] * target["head_dim"] for key in ("num_attention_heads", "num_key_value_heads")
    )
    shapes = {"q_proj": (heads, hidden), "k_proj": (kv_heads, hidden), "v_proj": (kv_heads, hidden),
              "o_proj": (hidden, heads), "gate_proj": (inner, hidden), "up_proj": (inner, hidden),
              "down_proj": (hidden, inner), "embed_tokens": (shape[0], hidden),
              "lm_head": (shape[0], hidden)}  # fmt: skip
    return shapes[name.split(".")[-2]]


def _embed(
    value: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator, zero_rest: bool
) -> torch.Tensor:
    """`value` in the leading block of a tensor of `shape`; the rest zero or small random draws."""
    rest = torch.zeros(shape) if zero_rest else torch.randn(shape, generator=gen) * float(value.std())
    rest[tuple(slice(0, n) for n in value.shape)] = value
    return rest


def wider_config(source: dict, factor: int) -> dict:
    """The source's config with hidden, heads, kv heads and intermediate times `factor`, eps rescaled."""
    return {**source, "hidden_size": source["hidden_size"] * factor,
            "intermediate_size": source["intermediate_size"] * factor,
            "num_attention_heads": source["num_attention_heads"] * factor,
            "num_key_value_heads": source["num_key_value_heads"] * factor,
            "head_dim": source["hidden_size"] // source["num_attention_heads"],
            "rms_norm_eps": source["rms_norm_eps"] / factor}  # fmt: skip


def save_grown(state: dict[str, torch.Tensor], config: dict, dest: Path) -> None:
    """Load the grown weights into a model of `config` (every weight placed) and save it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(state, strict=True)
    model.save_pretrained(dest, safe_serialization=True)


@torch.inference_mode()
def max_logit_diff(a, b, ids: torch.Tensor) -> float:
    """max |logits(a) - logits(b)| on the same inputs."""
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())
