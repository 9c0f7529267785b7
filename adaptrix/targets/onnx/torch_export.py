"""A base exported with torch.onnx (the TorchScript exporter), where optimum and the builder do not.

Encoders are exported with optimum's input and output names (`input_ids`, `attention_mask`,
`token_type_ids` -> `logits` or `last_hidden_state` [+ `pooler_output`]). Decoders take
`input_ids`, `attention_mask`, `position_ids` and `past_key_values.N.key/value` [batch,
kv_heads, past, head_dim] and return `logits` and `present.N.key/value`, as optimum's do, so
Adaptrix's runtime runs both alike. The TorchScript exporter names each node by the module that
made it (`/model/layers.0/self_attn/q_proj/MatMul`), which is how the patcher finds weights. The
graph is checked against the model's PyTorch forward on other inputs before it is kept (torch_check.py).

Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) route each token through a loop over
the experts that the batch happens to hit, which a trace would freeze; they are exported dense:
every expert runs on every token and is weighted by its routing weight, zero where the router did
not pick it. The result is the same sum (exact up to float rounding); the graph computes all
experts, so it is slower than a sparse kernel by about experts / experts-per-token. Under
transformers 5 the block's router is traced as it is and only its experts module (packed 3-D
parameters) runs dense, as batched MatMuls reading each packed parameter whole: the graph keeps it
as an initializer named after it, whose rows the patcher replaces (packed_patch.py).
"""

from __future__ import annotations

import logging
import types
import warnings
from pathlib import Path

import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.onnx.export_outputs import POOLER_OUTPUT, has_pooler
from adaptrix.targets.onnx.exporters import EXPORT_FAILURES, export_failed
from adaptrix.targets.onnx.tasks import CAUSAL_TASK
from adaptrix.targets.onnx.torch_check import check_export, check_inputs, load_model

__all__ = ["dense_moe_forward", "dense_packed_experts_forward", "torch_export"]

logger = logging.getLogger(__name__)

_OPSET = 17
# MoE blocks routed as dense_moe_forward computes (transformers 4.57's classes; under 5 their
# routers route and their packed experts run dense_packed_experts_forward)
_DENSE_MOE = frozenset({"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                        "OlmoeSparseMoeBlock"})  # fmt: skip


def torch_export(base: Checkpoint, task: str, file: Path) -> None:
    """Export `base` for `task` to `file` (weights beside it) with the TorchScript exporter.

    Any failure of the model's own code, of the tracer or of onnxruntime running the check is one
    line naming the family (the family's export is not supported), never a traceback.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    failures = (*EXPORT_FAILURES, AssertionError, ort_state.Fail, ort_state.InvalidArgument,
                ort_state.InvalidGraph, ort_state.NotImplemented, ort_state.RuntimeException)  # fmt: skip
    try:
        _export(base, task, file)
    except failures as exc:
        raise export_failed("torch.onnx's export", base, exc) from None


def _export(base: Checkpoint, task: str, file: Path) -> None:
    # The check's reference: the model as users run it (its default attention), loaded first and
    # let go before the eager model the tracer can follow is loaded.
    checked = check_inputs(load_model(base, task, None), base, task)
    model = load_model(base, task, "eager")
    dense = _densify_experts(model, base)
    if dense:
        logger.info("exporting %d mixture-of-experts blocks dense (every expert on every token)", dense)
    wrapper, args, inputs, outputs, axes = (_decoder if task == CAUSAL_TASK else _encoder)(model, base, task)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer warns about every data-dependent branch it records
        torch.onnx.export(wrapper, args, str(file), dynamo=False, opset_version=_OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes)  # fmt: skip
    check_export(file, checked, base, task)


def _encoder(model, base: Checkpoint, task: str):
    """The wrapper, example inputs and names of an encoder's export."""
    forward_args = model.forward.__code__.co_varnames
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in forward_args else [])
    outputs = ["last_hidden_state"] if task == "feature-extraction" else ["logits"]
    if task == "feature-extraction" and has_pooler(base):
        outputs.append(POOLER_OUTPUT)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            result = self.model(**dict(zip(names, tensors, strict=True)))
            return tuple(result[name] for name in outputs)

    ids = torch.randint(3, base.source.vocab_size, (2, 7))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))[: len(names)]
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in names + outputs[:1]}
    axes.update({name: {0: "batch_size"} for name in outputs[1:]})
    return Encoder(), args, names, outputs, axes


def _decoder(model, base: Checkpoint, task: str):
    """The wrapper (flat KV cache in and out), example inputs and names of a decoder's export."""
    from transformers import DynamicCache

    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [name.replace("past_key_values.", "present.") for name in past_names]
    window = _sliding_window(config, base)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            if hasattr(DynamicCache, "from_legacy_cache"):
                cache = DynamicCache.from_legacy_cache(tuple(pairs))
            else:
                cache = DynamicCache(pairs, config=config)
            mask = _additive_mask(attention_mask, input_ids.shape[1], window)
            result = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=True)  # fmt: skip
            cache = result.past_key_values
            flat = []
            for i in range(layers):
                flat += [cache.layers[i].keys, cache.layers[i].values]
            return (result.logits, *flat)

    batch, length, past_len = 2, 3, 4
    ids = torch.randint(3, base.source.vocab_size, (batch, length))
    mask = torch.ones(batch, past_len + length, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + length).expand(batch, length)
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in past_names]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
            **{name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names},
            **{name: {0: "batch_size", 2: "total_sequence_length"} for name in present}}  # fmt: skip
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    return Decoder(), (ids, mask, positions, *past), names, ["logits", *present], axes


def _sliding_window(config, base: Checkpoint) -> int | None:
    """The attention window every layer uses (None: full attention); a per-layer mix is refused."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if kinds != {"sliding_attention"}:
        raise UnsupportedError(
            f"torch.onnx export of a {config.model_type} base mixing full and sliding-window attention "
            f"layers ({sorted(kinds)}) is not supported here",
            path=base.path,
            fix="use --target merged or --target hooks for this base",
        )
    return int(window)


def _additive_mask(mask: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """The 4-D float mask [batch, 1, new, past + new] eager attention adds, from the 2-D padding mask.

    Built here in plain tensor ops: transformers' own mask functions use vmap, which TorchScript
    cannot trace; a 4-D mask is taken as given.
    """
    total = mask.shape[1]
    keys = torch.arange(total)
    queries = torch.arange(length) + (total - length)
    allowed = keys[None, :] <= queries[:, None]
    if window is not None:
        allowed = allowed & (keys[None, :] > queries[:, None] - window)
    allowed = allowed[None, None] & mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _densify_experts(model: torch.nn.Module, base: Checkpoint) -> int:
    """Give each sparse MoE block the dense forward; the number of blocks changed.

    Only the blocks whose routing dense_moe_forward repeats (softmax, top-k, optionally
    renormalized; a sigmoid-gated shared expert): any other module with experts routes its own way
    (grouped top-k, score biases, sparsemixer, ...) and a trace of it would freeze the experts one
    input picked, so it is refused.
    """
    count = 0
    for name, module in model.named_modules():
        if not hasattr(module, "experts"):
            continue
        if type(module).__name__ in _DENSE_MOE and _packed_experts(module.experts, model.config):
            # transformers 5: the block routes (a router module, traced whole); its experts loop
            module.experts.forward = types.MethodType(dense_packed_experts_forward, module.experts)
            count += 1
            continue
        if type(module).__name__ not in _DENSE_MOE or not isinstance(module.experts, torch.nn.ModuleList):
            raise UnsupportedError(
                f"module {name} ({type(module).__name__}): torch.onnx would trace its expert routing for "
                "one input only, and Adaptrix's dense export does not know how it routes",
                path=base.path,
                fix="use --target merged or --target hooks for this base",
            )
        module.forward = types.MethodType(dense_moe_forward, module)
        count += 1
    return count


def dense_moe_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse MoE block's output, every expert weighted by its (zero where unpicked) routing weight."""
    batch, length, hidden = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden)
    router_logits = self.gate(flat)
    weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
    top, picked = torch.topk(weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always normalizes; Qwen-MoE where configured
        top = top / top.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(weights).scatter(1, picked, top).to(flat.dtype)
    out = torch.zeros_like(flat)
    for index, expert in enumerate(self.experts):
        out = out + dense[:, index : index + 1] * expert(flat)
    shared = getattr(self, "shared_expert", None)
    if shared is not None:
        out = out + torch.sigmoid(self.shared_expert_gate(flat)) * shared(flat)
    return out.reshape(batch, length, hidden), router_logits


def _packed_experts(experts: torch.nn.Module, config) -> bool:
    """Packed experts (transformers 5): gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    params = dict(experts.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if set(params) != {"gate_up_proj", "down_proj"} or gate_up.dim() != 3 or down.dim() != 3:
        return False
    experts_count, double, hidden = gate_up.shape
    layout = getattr(experts, "is_concatenated", True) and not getattr(experts, "is_transposed", False)
    shapes = tuple(down.shape) == (experts_count, hidden, double // 2)
    return layout and shapes and hidden == config.hidden_size


def dense_packed_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Packed experts (transformers 5) dense: every expert on every token, weighted (zero where unpicked).

    The packed parameters are MatMul inputs as they are (no slice, no transpose for the exporter to
    fold), so the graph keeps them as initializers named after the parameter, which the patcher finds.
    """
    experts = self.gate_up_proj.shape[0]
    dense = hidden_states.new_zeros(hidden_states.shape[0], experts, dtype=top_k_weights.dtype)
    dense = dense.scatter(1, top_k_index, top_k_weights).to(hidden_states.dtype)  # [T, E]
    columns = hidden_states.transpose(0, 1)[None]  # [1, H, T]
    gate, up = torch.matmul(self.gate_up_proj, columns).chunk(2, dim=1)  # [E, I, T] each
    out = torch.matmul(self.down_proj, self.act_fn(gate) * up)  # [E, H, T]
    return (out * dense.transpose(0, 1)[:, None, :]).sum(dim=0).transpose(0, 1)
