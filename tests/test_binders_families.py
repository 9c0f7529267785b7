"""Role tables of the families people fine-tune: tiny checkpoints load, fused splits match the modules'
own forward, LoRA on every linear module compiles to merged and hooks equal to PEFT's forward, and
through AIR and the redistribute pass."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers as tf
from builders import (
    FAMILIES,
    FP32_TOLERANCE,
    TRANSFORMERS_5,
    load_model,
    make_adapter,
    model_logits,
    peft_logits,
    sample_inputs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_air import cli
from test_binders import _randomized
from test_hooks_parity import check_attach_matches_peft, compile_bundle
from torch import nn
from transformers import AttentionInterface
from transformers.models.bloom.modeling_bloom import BloomAttention
from transformers.models.falcon.modeling_falcon import FalconAttention
from transformers.models.gpt_bigcode.modeling_gpt_bigcode import GPTBigCodeAttention
from transformers.models.modernbert import modeling_modernbert as modernbert

from adaptrix import compile_adapter
from adaptrix.binders import BINDERS
from adaptrix.binders.table import split_rows
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.values import Role, SourceModel

# The families of issue 25's role tables (RoBERTa: BERT's table, checked here too).
NEW = (
    "bloom", "cohere", "deberta-v2", "falcon", "gemma", "gemma2", "gemma3_text", "gpt_bigcode", "gptj",
    "granite", "mixtral", "modernbert", "olmo", "olmo2", "opt", "phi", "qwen2_moe", "qwen3", "qwen3_moe",
    "roberta", "smollm3", "stablelm", "starcoder2",
)  # fmt: skip
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")  # experts, routers and shared experts have no role
# (id, family, config overrides, kv heads the model really has): layouts a family's config selects.
VARIANTS = [
    *[(f, f, {}, {"falcon": 1, "gpt_bigcode": 1}.get(f)) for f in NEW],  # both multi-query by default
    ("falcon-new-architecture", "falcon", dict(new_decoder_architecture=True, num_kv_heads=2), 2),
    ("falcon-per-head", "falcon", dict(multi_query=False, parallel_attn=False), 4),
    ("gpt_bigcode-per-head", "gpt_bigcode", dict(multi_query=False), 4),
    # (qk_layernorm=True: transformers 4.57 cannot initialise it, its per-head norms have no bias)
    ("stablelm-parallel", "stablelm", dict(use_parallel_residual=True), 2),
]
_IDS = [v[0] for v in VARIANTS]
_ATTENTION_ROLES = {Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O}


def _base(bases, family: str, overrides: dict):
    return bases(family, json.dumps(overrides, sort_keys=True), **overrides) if overrides else bases(family)


@pytest.mark.parametrize(("family", "overrides", "kv_heads"), [v[1:] for v in VARIANTS], ids=_IDS)
def test_tiny_checkpoint_loads_and_names_one_module_per_role(family, overrides, kv_heads, bases):
    checkpoint = Checkpoint(_base(bases, family, overrides))  # shapes by role, layers, model-level modules
    config = checkpoint.config
    if kv_heads is not None:
        assert checkpoint.source.num_kv_heads == kv_heads
    assert checkpoint.source.num_layers == 2 and checkpoint.source.vocab_size == config["vocab_size"]
    roles: dict[int | None, list[Role]] = {}
    for name in checkpoint.tensors:
        module, _, param = name.rpartition(".")
        placement = checkpoint.binder.resolve(module)
        if placement is not None and param == "weight":
            roles.setdefault(placement.layer, []).extend(placement.module.roles)
    for layer, found in roles.items():
        assert len(found) == len(set(found)), (layer, found)  # two modules of one role would share a site
    for layer in range(2):
        wanted = _ATTENTION_ROLES if family in MOE else _ATTENTION_ROLES | {Role.MLP_UP, Role.MLP_DOWN}
        assert wanted <= set(roles[layer]), (layer, roles[layer])
    assert Role.EMBED in roles[None]


@pytest.mark.parametrize(("family", "overrides", "kv_heads"), [v[1:] for v in VARIANTS], ids=_IDS)
def test_layer_tables_follow_the_models_module_order(family, overrides, kv_heads):
    """PEFT walks modules in the model's order, and combine's dare draws its random masks in it."""
    spec = FAMILIES[family]
    model = spec.model(spec.config(**{**spec.config_kwargs, **overrides}))
    binder = BINDERS[model.config.model_type]
    in_model = [p.key for name, _ in model.named_modules()
                if (p := binder.resolve(name)) and p.layer == 0 and p.module.is_linear]  # fmt: skip
    # (norms aside: Falcon declares them in an order that depends on the variant)
    assert in_model == [key for key in binder.layer_modules if key in in_model]


@pytest.mark.parametrize(("model_type", "flags", "kv_heads"), [
    ("falcon", {}, 1), ("falcon", {"multi_query": False}, 8), ("falcon", {"num_kv_heads": 2}, 1),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, 2),
    ("falcon", {"new_decoder_architecture": True}, 8),
    ("gpt_bigcode", {}, 1), ("gpt_bigcode", {"multi_query": False}, 8),
])  # fmt: skip
def test_multi_query_configs_read_as_transformers_builds_them(model_type, flags, kv_heads):
    """Older configs leave the flags and the kv heads out; transformers' defaults decide."""
    names = {"falcon": ("hidden_size", "num_hidden_layers", "num_attention_heads"),
             "gpt_bigcode": ("n_embd", "n_layer", "n_head")}[model_type]  # fmt: skip
    dims = dict(zip(names, (64, 2, 8), strict=True))
    config = {"model_type": model_type, "vocab_size": 128, **dims, **flags}
    source = BINDERS[model_type].source_model(config, "config.json")
    attention = (FalconAttention if model_type == "falcon" else GPTBigCodeAttention)(
        tf.AutoConfig.for_model(**config), layer_idx=0
    )
    fused = attention.query_key_value if model_type == "falcon" else attention.c_attn
    built = (fused.out_features - source.q_size) // (2 * source.head_dim)  # the kv heads its weight holds
    assert source.num_kv_heads == built == kv_heads


QUICK = settings(max_examples=15, deadline=None)


@st.composite
def dims(draw) -> tuple[int, int, int]:
    """(heads, kv heads dividing heads, even head_dim)."""
    heads = draw(st.integers(1, 6))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    return heads, kv_heads, 2 * draw(st.integers(1, 4))


def _ours(
    binder: str, key: str, fused: nn.Linear, source: SourceModel, x: torch.Tensor
) -> list[torch.Tensor]:
    """q, k, v from the rows our split gives each role, as [batch, seq, heads, head_dim]."""
    module = BINDERS[binder].layer_modules[key]
    outs = []
    for rows in split_rows(module.split, source):
        y = x @ fused.weight[rows].T + (0 if fused.bias is None else fused.bias[rows])
        outs.append(y.view(*x.shape[:-1], -1, source.head_dim))
    return outs


def _inputs(hidden: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for got, want in zip(ours, theirs, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(TRANSFORMERS_5, reason="checked against transformers 4.57's FalconAttention internals")
@pytest.mark.parametrize("layout", ["multi_query", "new_decoder_architecture", "per_head"])
@QUICK
@given(shape=dims(), seed=st.integers(0, 2**31 - 1))
def test_falcon_grouped_split_matches_its_attention(layout, shape, seed):
    heads, kv_heads, head_dim = shape
    flags = {
        "multi_query": dict(multi_query=True),
        "per_head": dict(multi_query=False),
        "new_decoder_architecture": dict(new_decoder_architecture=True, num_kv_heads=kv_heads),
    }[layout]
    config = tf.FalconConfig(hidden_size=heads * head_dim, num_attention_heads=heads, **flags)
    source = BINDERS["falcon"].source_model(config.to_dict(), "config.json")
    assert source.num_kv_heads == {"multi_query": 1, "per_head": heads}.get(layout, kv_heads)
    attention = _randomized(FalconAttention(config), seed)
    x = _inputs(source.hidden_size, seed + 1)
    with torch.no_grad():
        fused = attention.query_key_value
        q, k, v = attention._split_heads(fused(x))  # [batch, seq, heads, head_dim]; k, v broadcast
        ours = _ours("falcon", "self_attention.query_key_value", fused, source, x)
    if layout == "new_decoder_architecture":  # each kv head repeated for its group, as the module does
        ours = [ours[0], *(t.repeat_interleave(heads // kv_heads, dim=2) for t in ours[1:])]
    _assert_same(ours, [q, k, v])


@QUICK
@given(shape=dims(), seed=st.integers(0, 2**31 - 1))
def test_bloom_headwise_split_matches_its_attention(shape, seed):
    heads, _, head_dim = shape
    config = tf.BloomConfig(hidden_size=heads * head_dim, n_head=heads)
    source = BINDERS["bloom"].source_model(config.to_dict(), "config.json")
    attention = _randomized(BloomAttention(config), seed)
    x = _inputs(source.hidden_size, seed + 1)
    with torch.no_grad():
        fused = attention.query_key_value
        theirs = attention._reshape(fused(x))
        ours = _ours("bloom", "self_attention.query_key_value", fused, source, x)
    _assert_same([t.transpose(1, 2) for t in ours], list(theirs))  # BLOOM's: [batch, heads, seq, head_dim]


_CAPTURED: dict[str, torch.Tensor] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    _CAPTURED.update(q=query, k=key, v=value)
    return query.transpose(1, 2).contiguous(), None


AttentionInterface.register("adaptrix_capture_families", _capture)


@pytest.mark.parametrize("multi_query", [True, False], ids=["multi-query", "per-head"])
@QUICK
@given(shape=dims(), seed=st.integers(0, 2**31 - 1))
def test_gpt_bigcode_split_matches_its_attention(multi_query, shape, seed):
    heads, _, head_dim = shape
    config = tf.GPTBigCodeConfig(n_embd=heads * head_dim, n_head=heads, multi_query=multi_query)
    config._attn_implementation = "adaptrix_capture_families"
    source = BINDERS["gpt_bigcode"].source_model(config.to_dict(), "config.json")
    assert source.num_kv_heads == (1 if multi_query else heads)
    attention = _randomized(GPTBigCodeAttention(config, layer_idx=0), seed)
    x = _inputs(source.hidden_size, seed + 1)
    _CAPTURED.clear()
    with torch.no_grad():
        attention(x)
        ours = _ours("gpt_bigcode", "attn.c_attn", attention.c_attn, source, x)
    _assert_same([t.transpose(1, 2) for t in ours], [_CAPTURED[n] for n in "qkv"])


@pytest.mark.skipif(TRANSFORMERS_5, reason="checked against transformers 4.57's ModernBERT internals")
@QUICK
@given(shape=dims(), inter=st.integers(1, 24), seed=st.integers(0, 2**31 - 1))
def test_modernbert_wqkv_and_wi_splits_match_its_forward(shape, inter, seed):
    heads, _, head_dim = shape
    config = tf.ModernBertConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, intermediate_size=inter
    )
    config._attn_implementation = "eager"
    source = BINDERS["modernbert"].source_model(config.to_dict(), "config.json")
    attention = _randomized(modernbert.ModernBertAttention(config, layer_id=0), seed)
    mlp = _randomized(modernbert.ModernBertMLP(config), seed + 2)
    x = _inputs(source.hidden_size, seed + 1)

    def capture(module, qkv, **kwargs):  # ModernBERT's attention functions take the viewed qkv
        _CAPTURED.update(q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2])
        return (torch.zeros(*qkv.shape[:2], kwargs["dim"], dtype=qkv.dtype),)

    _CAPTURED.clear()
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setitem(modernbert.MODERNBERT_ATTENTION_FUNCTION, "eager", capture)
        attention(x)
        _assert_same(
            _ours("modernbert", "attn.Wqkv", attention.Wqkv, source, x), [_CAPTURED[n] for n in "qkv"]
        )
        module = BINDERS["modernbert"].layer_modules["mlp.Wi"]
        assert module.roles == (Role.MLP_GATE, Role.MLP_UP)  # act(gate) * up, as LLaMA's
        gate_rows, up_rows = split_rows(module.split, source)
        gate, up = (x @ mlp.Wi.weight[rows].T for rows in (gate_rows, up_rows))  # mlp_bias: no bias
        torch.testing.assert_close(mlp.Wo(mlp.act(gate) * up), mlp(x), rtol=1e-10, atol=1e-10)


# Every linear module has a role (no experts): PEFT's "all-linear" compiles.
ALL_LINEAR = [v for v in VARIANTS if v[1] not in MOE]


@pytest.mark.parametrize(
    ("family", "overrides"), [v[1:3] for v in ALL_LINEAR], ids=[v[0] for v in ALL_LINEAR]
)
def test_all_linear_lora_compiles_to_merged_and_hooks_equal_to_peft(family, overrides, bases, tmp_path):
    base = _base(bases, family, overrides)
    adapter = make_adapter(family, base, tmp_path / "adapter", target_modules="all-linear")
    targeted = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert len(targeted) >= 4, targeted
    compile_adapter(adapter, base, "merged", tmp_path / "merged")
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    assert (model_logits(family, base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    assert (model_logits(family, tmp_path / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE
    check_attach_matches_peft(family, base, adapter, compile_bundle(adapter, base, tmp_path / "bundle"))


@pytest.mark.parametrize("family", MOE)
def test_moe_attention_lora_compiles_to_merged_equal_to_peft(family, bases, tmp_path):
    base = bases(family)
    adapter = make_adapter(family, base, tmp_path / "adapter")  # q, k, v, o: the experts have no role
    compile_adapter(adapter, base, "merged", tmp_path / "merged")
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    assert (model_logits(family, tmp_path / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE


@pytest.mark.parametrize(("family", "overrides"), [
    ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)), ("bloom", {}), ("modernbert", {}),
])  # fmt: skip
def test_air_round_trip_of_fused_families(family, overrides, bases, tmp_path):
    base = _base(bases, family, overrides)
    adapter = make_adapter(family, base, tmp_path / "adapter", target_modules="all-linear")
    air = tmp_path / "adapter.air"
    cli("convert", adapter, "--to", "air", "-o", air, "--base", base)
    cli("compile", air, "--base", base, "--target", "merged", "-o", tmp_path / "merged")
    inputs = sample_inputs(family)
    expected = peft_logits(family, base, adapter, inputs)
    assert (model_logits(family, tmp_path / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE
    assert load_model(family, tmp_path / "merged") is not None


def _grow_deeper(family: str, source_dir, out_dir, positions: tuple[int, ...], depth: int):
    """A deeper model of `family` computing what `source_dir` computes (growth.py's, for any table).

    Source layer i sits at positions[i]; every other layer copies its nearest placed layer with its
    attention output and MLP down projections (found by role) zeroed, so the residual passes through.
    """
    source = load_model(family, source_dir)
    binder = BINDERS[source.config.model_type]
    layer_re = re.compile(rf"(.*\.{binder.layer_container}\.)(\d+)\.(.+)")
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = depth
    old = source.state_dict()
    new = {key: value for key, value in old.items() if not layer_re.fullmatch(key)}
    for key, value in old.items():
        if match := layer_re.fullmatch(key):
            placement = binder.resolve(key.rpartition(".")[0])
            outputs = placement is not None and {Role.ATTN_O, Role.MLP_DOWN} & set(placement.module.roles)
            for layer in range(depth):
                if max([i for i, p in enumerate(positions) if p <= layer] or [0]) == int(match.group(2)):
                    zero = outputs and layer not in positions
                    new[f"{match.group(1)}{layer}.{match.group(3)}"] = value * 0 if zero else value.clone()
    model = FAMILIES[family].model(config).eval()
    model.load_state_dict(new, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.mark.parametrize(("family", "overrides"), [
    ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)), ("opt", {}), ("phi", {}),
])  # fmt: skip
def test_redistribute_carries_an_adapter_onto_a_grown_base(family, overrides, bases, tmp_path):
    source = bases(family, "four-layers" + json.dumps(overrides), num_hidden_layers=4, **overrides)
    deeper = _grow_deeper(family, source, tmp_path / "deeper", (1, 2, 5, 7), 8)
    inputs = sample_inputs(family)
    assert (model_logits(family, deeper, inputs) - model_logits(family, source, inputs)).abs().max() <= 1e-5
    adapter = make_adapter(family, source, tmp_path / "adapter", target_modules="all-linear")
    air = tmp_path / "adapter.air"
    cli("convert", adapter, "--to", "air", "-o", air, "--base", source)
    compile_adapter(air, deeper, "merged", tmp_path / "out", passes=["redistribute:layers=1,2,5,7"])
    expected = peft_logits(family, source, adapter, inputs)
    assert (model_logits(family, tmp_path / "out", inputs) - expected).abs().max() <= FP32_TOLERANCE
