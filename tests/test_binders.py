"""Binders: fused splits are exact inverses and match the modules' own forward; every name resolves."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as tf
from builders import FAMILIES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AttentionInterface
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3MLP
from transformers.pytorch_utils import Conv1D

from adaptrix.binders import BINDERS, binder_for_model_type
from adaptrix.binders.table import Layout, fuse_rows, split_rows
from adaptrix.io.checkpoint import binder_for
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Role, SourceModel

FUSED = sorted(
    {
        (binder.name, key)
        for binder in BINDERS.values()
        for key, module in binder.layer_modules.items()
        if module.split is not None
    }
)
_BY_NAME = {binder.name: binder for binder in BINDERS.values()}
# binders whose fused attention has fewer key/value heads than query heads
_GQA = {"phi3", "falcon", "gpt_bigcode"}


@st.composite
def dims(draw) -> tuple[int, int, int, int]:
    """(heads, kv heads dividing heads, even head_dim, intermediate size)."""
    heads = draw(st.integers(1, 6))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    return heads, kv_heads, 2 * draw(st.integers(1, 4)), draw(st.integers(1, 24))


def _source(family: str, heads: int, kv_heads: int, head_dim: int, inter: int) -> SourceModel:
    kv_heads = kv_heads if family in _GQA else heads
    return SourceModel(family, heads * head_dim, 1, heads, kv_heads, head_dim, inter, 16)


def _role_size(role: Role, source: SourceModel) -> int:
    if role is Role.ATTN_Q:
        return source.q_size
    if role in (Role.ATTN_K, Role.ATTN_V):
        return source.kv_size
    return source.intermediate_size


QUICK = settings(max_examples=40, deadline=None)


@pytest.mark.parametrize(("family", "key"), FUSED, ids=[f"{f}-{k}" for f, k in FUSED])
@QUICK
@given(shape=dims(), cols=st.integers(0, 5), seed=st.integers(0, 2**31 - 1))
def test_split_then_fuse_is_identity(family, key, shape, cols, seed):
    module = _BY_NAME[family].layer_modules[key]
    source = _source(family, *shape)
    index = split_rows(module.split, source)
    assert [len(rows) for rows in index] == [_role_size(r, source) for r in module.roles]
    total = sum(len(rows) for rows in index)
    assert torch.equal(torch.cat(index).sort().values, torch.arange(total)), "not a permutation"
    fused = torch.randn(total, cols, generator=torch.Generator().manual_seed(seed))
    parts = [fused[rows] for rows in index]
    assert torch.equal(fuse_rows(parts, index), fused)
    assert all(torch.equal(fuse_rows(parts, index)[rows], p) for rows, p in zip(index, parts, strict=True))


# The attention modules are run with an attention function that records what they computed.
_CAPTURED: dict[str, torch.Tensor] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    _CAPTURED.update(q=query, k=key, v=value)
    return query.transpose(1, 2).contiguous(), None


AttentionInterface.register("adaptrix_capture", _capture)


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    """The module in float64 (so that comparisons are exact up to rounding) with random parameters."""
    module = module.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module.eval()


def _split_projection(family: str, key: str, fused: nn.Module, source: SourceModel, x: torch.Tensor):
    """Each role's output computed from the rows our split assigns it, shaped [batch, heads, seq, dim]."""
    module = _BY_NAME[family].layer_modules[key]
    weight = fused.weight.T if module.layout is Layout.CONV1D else fused.weight
    assert tuple(weight.shape) == (sum(map(len, split_rows(module.split, source))), x.shape[-1])
    out = {}
    for role, rows in zip(module.roles, split_rows(module.split, source), strict=True):
        y = x @ weight[rows].T + (0 if fused.bias is None else fused.bias[rows])
        out[role] = y.view(*x.shape[:-1], -1, source.head_dim).transpose(1, 2)
    return out


def _inputs(source: SourceModel, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, source.hidden_size, generator=generator, dtype=torch.float64)


def _identity_rotary(x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*x.shape[:-1], head_dim)
    return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)


def _attention(family: str, source: SourceModel) -> tuple[nn.Module, str, dict]:
    """The family's HF attention module for these dims, its fused key, and forward kwargs."""
    h, n, kv = source.hidden_size, source.num_heads, source.num_kv_heads
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=h, n_head=n, n_layer=1)
        return GPT2Attention(config, layer_idx=0), "attn.c_attn", {}
    if family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=h, num_attention_heads=n, num_hidden_layers=1)
        return GPTNeoXAttention(config, layer_idx=0), "attention.query_key_value", {"rotary": True}
    config = tf.Phi3Config(hidden_size=h, num_attention_heads=n, num_key_value_heads=kv, num_hidden_layers=1)
    return Phi3Attention(config, layer_idx=0), "self_attn.qkv_proj", {"rotary": True}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3"])
@QUICK
@given(shape=dims(), seed=st.integers(0, 2**31 - 1))
def test_qkv_split_matches_the_module_forward(family, shape, seed):
    source = _source(family, *shape)
    attention, key, extra = _attention(family, source)
    attention.config._attn_implementation = "adaptrix_capture"
    attention = _randomized(attention, seed)
    x = _inputs(source, seed + 1)
    kwargs = {"attention_mask": None}
    if extra.get("rotary"):
        kwargs["position_embeddings"] = _identity_rotary(x, source.head_dim)
    _CAPTURED.clear()
    with torch.no_grad():
        attention(x, **kwargs)
        ours = _split_projection(family, key, attention.get_submodule(key.split(".")[-1]), source, x)
    for role, name in ((Role.ATTN_Q, "q"), (Role.ATTN_K, "k"), (Role.ATTN_V, "v")):
        assert ours[role].shape == _CAPTURED[name].shape, role
        torch.testing.assert_close(ours[role], _CAPTURED[name], rtol=1e-10, atol=1e-10)


@QUICK
@given(shape=dims(), seed=st.integers(0, 2**31 - 1))
def test_phi3_gate_up_split_matches_the_mlp_forward(shape, seed):
    source = _source("phi3", *shape)
    config = tf.Phi3Config(hidden_size=source.hidden_size, intermediate_size=source.intermediate_size)
    mlp = _randomized(Phi3MLP(config), seed)
    module = _BY_NAME["phi3"].layer_modules["mlp.gate_up_proj"]
    x = _inputs(source, seed + 1)
    gate_rows, up_rows = split_rows(module.split, source)
    assert module.roles == (Role.MLP_GATE, Role.MLP_UP)
    with torch.no_grad():
        weight = mlp.gate_up_proj.weight
        gate, up = x @ weight[gate_rows].T, x @ weight[up_rows].T
        ours = mlp.down_proj(up * mlp.activation_fn(gate))
        torch.testing.assert_close(ours, mlp(x), rtol=1e-10, atol=1e-10)


_NORM_TYPES = (nn.LayerNorm,)
_LAYOUTS = {nn.Linear: Layout.LINEAR, Conv1D: Layout.CONV1D, nn.Embedding: Layout.EMBEDDING}


def _layout_of(module: nn.Module) -> Layout | None:
    if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
        # OLMo's LayerNorm has no weight: nothing to place
        return Layout.NORM if getattr(module, "weight", None) is not None else None
    return next((layout for kind, layout in _LAYOUTS.items() if isinstance(module, kind)), None)


def test_every_model_type_has_a_tiny_model():
    assert set(BINDERS) <= set(FAMILIES), set(BINDERS) - set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(BINDERS))
def test_binder_resolves_every_module_of_a_tiny_model(model_type):
    spec, binder = FAMILIES[model_type], BINDERS[model_type]
    torch.manual_seed(0)
    model = spec.model(spec.config(**spec.config_kwargs))
    binder = binder.bind(model.config.to_dict(), "config.json")  # an encoder-decoder's stacks numbered
    seen = set()
    for name, module in model.named_modules():
        layout = _layout_of(module)
        if layout is None:
            continue
        placement = binder.resolve(name)
        if placement is None and _left_unnamed(spec, binder, name):
            continue
        assert placement is not None, f"{model_type}: {name} ({type(module).__name__}) has no role"
        assert placement.module.layout is layout, (name, placement.module.layout, layout)
        assert placement.layer == _expected_layer(binder, f".{name}"), name
        seen.add(placement.key)
    # Every layer entry of the table names a module that the family really has (or may lack).
    tables = [(binder.layer_modules, binder.optional_modules)]
    tables += [(stack.layer_modules, stack.optional_modules) for stack in binder.stacks]
    for table, optional in tables:
        assert set(table) - optional <= seen, set(table) - seen


def _expected_layer(binder, name: str) -> int | None:
    """The layer number in the name, after the stacks before its own (encoder-decoders)."""
    stacks = [(binder.layer_container, 0), *((s.container, s.start) for s in binder.stacks)]
    for container, start in stacks:
        if (marker := f".{container}.") in name:
            return start + int(name.split(marker)[1].split(".")[0])
    return None


def _left_unnamed(spec, binder, name: str) -> bool:
    """Whether the family's table leaves this module to the module-tree binder (builders' `unnamed`)."""
    marker = f".{binder.layer_container}."
    key = name.split(marker, 1)[1].split(".", 1)[1] if marker in name else name
    return any(re.fullmatch(pattern, key) for pattern in spec.unnamed)


def test_unknown_model_type_is_refused_with_the_supported_list(tmp_path):
    with pytest.raises(UnsupportedError) as raised:
        binder_for_model_type("mamba", tmp_path / "config.json")
    line = raised.value.line()
    assert "mamba" in line and str(tmp_path / "config.json") in line
    assert all(model_type in line for model_type in BINDERS)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_family"}))
    with pytest.raises(UnsupportedError, match="which this transformers does not know"):
        binder_for(tmp_path)


def test_base_without_config_is_refused(tmp_path):
    with pytest.raises(BadInputError, match=r"has no config\.json"):
        binder_for(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        binder_for(tmp_path)
