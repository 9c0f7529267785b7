"""Adaptrix's copy of PEFT's targeting and scaling rules agrees with PEFT itself.

Each example writes an adapter_config.json with `LoraConfig.save_pretrained` and reads it with
Adaptrix's `read_lora_settings`; PEFT's side uses `LoraConfig.from_pretrained` of the same file,
as PEFT does when it loads an adapter (saving sorts the keys of rank_pattern and alpha_pattern,
and their order decides which pattern wins).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from adaptrix.frontends.peft.config import read_lora_settings
from adaptrix.frontends.peft.settings import LoraSettings, pattern_key

LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
          "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "embed_tokens", "lm_head")  # fmt: skip
NAMES = (*LEAVES, "self_attn.q_proj", "mlp.down_proj", "attn.c_attn", "model.embed_tokens", "proj")
REGEXES = (
    r".*\.(q|v)_proj",
    r"model\.layers\.[0-3]\..*_proj",
    r".*c_attn",
    r"lm_head",
    r".*\.layers\.\d*[02468]\..*",
    r".*(attn|attention)\..*",
    r"model\.layers\.1\.mlp\.(gate|up)_proj",
)
LAYER_PATTERNS = (None, "layers", "h", ["layers", "h"], "blocks", ["blocks", "layers"], [])

layer = st.integers(0, 5)
module_key = st.one_of(
    st.builds("model.layers.{}.self_attn.{}_proj".format, layer, st.sampled_from("qkvo")),
    st.builds("model.layers.{}.mlp.{}_proj".format, layer, st.sampled_from(("gate", "up", "down"))),
    st.builds("transformer.h.{}.attn.{}".format, layer, st.sampled_from(("c_attn", "c_proj"))),
    st.builds("transformer.h.{}.mlp.c_fc".format, layer),
    st.builds("gpt_neox.layers.{}.attention.query_key_value".format, layer),
    st.builds("model.layers.{}.block_sparse_moe.experts.{}.w1".format, layer, layer),
    st.sampled_from(("model.embed_tokens", "lm_head", "transformer.wte", "model.norm")),
)
layer_choice = st.one_of(st.none(), layer, st.lists(layer, max_size=4, unique=True))


def _suffixes(keys: list[str]) -> list[str]:
    """Names that match the given keys the way users write them: a leaf, a dotted tail, the key."""
    parts = [key.split(".") for key in keys]
    return sorted({".".join(p[-n:]) for p in parts for n in (1, 2, len(p))})


@st.composite
def configs_and_keys(draw) -> tuple[dict, list[str]]:
    """Module keys and the keyword arguments of a LoraConfig (that PEFT accepts) to test on them."""
    keys = draw(st.lists(module_key, min_size=1, max_size=8))
    names = st.sampled_from(sorted({*_suffixes(keys), *NAMES}))
    name_list = st.lists(names, min_size=1, max_size=4, unique=True)
    rare = st.integers(0, 3).map(lambda n: n == 0)
    kwargs = {
        "exclude_modules": draw(name_list | st.sampled_from(REGEXES)) if draw(rare) else None,
        "modules_to_save": draw(st.lists(names, min_size=1, max_size=2)) if draw(rare) else None,
    }
    if draw(rare):
        kwargs["target_modules"] = draw(st.sampled_from(REGEXES))
        return kwargs, keys
    kwargs["target_modules"] = draw(name_list)
    kwargs["layers_to_transform"] = draw(layer_choice)
    if kwargs["layers_to_transform"] is not None:
        kwargs["layers_pattern"] = draw(st.sampled_from(LAYER_PATTERNS))
    return kwargs, keys


def _saved_and_read(**kwargs) -> tuple[LoraSettings, LoraConfig]:
    """Save a LoraConfig, then read it back with Adaptrix and with PEFT."""
    with tempfile.TemporaryDirectory() as tmp:
        LoraConfig(**kwargs).save_pretrained(tmp)
        return read_lora_settings(Path(tmp)), LoraConfig.from_pretrained(tmp)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(case=configs_and_keys(), linear=st.booleans())
def test_targets_agree_with_peft(case, linear):
    config, keys = case
    ours, theirs = _saved_and_read(**config)
    for key in keys:
        # PEFT returns True, a match, None, False, or an _ExcludedModule (falsy) for excluded keys.
        expected = bool(check_target_module_exists(theirs, key))
        assert ours.targets(key, linear) == expected, (key, config)


def test_excluded_module_counts_as_not_targeted():
    ours, theirs = _saved_and_read(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    key = "model.layers.0.self_attn.v_proj"
    assert check_target_module_exists(theirs, key) is not None and not check_target_module_exists(theirs, key)
    assert not ours.targets(key, True) and ours.targets("model.layers.0.self_attn.q_proj", True)


PATTERN_KEYS = ("q_proj", "v_proj", "down_proj", "self_attn.q_proj", "mlp.down_proj",
                r"layers\.0\.self_attn\.q_proj", "model.layers.1.mlp.down_proj",
                r"layers\.\d+\.mlp\..*", r"(k|v)_proj", "c_attn", "proj")  # fmt: skip
patterns = st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 64), max_size=4)
alphas = st.dictionaries(
    st.sampled_from(PATTERN_KEYS), st.integers(1, 128) | st.sampled_from((0.5, 3.25, 12.0)), max_size=4
)


@FAST
@given(
    r=st.integers(1, 64),
    alpha=st.integers(1, 128),
    rank_pattern=patterns,
    alpha_pattern=alphas,
    rslora=st.booleans(),
    keys=st.lists(module_key, min_size=1, max_size=8),
)
def test_rank_alpha_and_scale_agree_with_peft(r, alpha, rank_pattern, alpha_pattern, rslora, keys):
    ours, theirs = _saved_and_read(
        r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        use_rslora=rslora, target_modules=["q_proj"],
    )  # fmt: skip
    for key in keys:
        assert pattern_key(ours.rank_pattern, key) == get_pattern_key(theirs.rank_pattern.keys(), key)
        assert pattern_key(ours.alpha_pattern, key) == get_pattern_key(theirs.alpha_pattern.keys(), key)
        # The lookup PEFT's LoraModel._create_and_replace does, then LoraLayer.update_layer's scale.
        peft_r = theirs.rank_pattern.get(get_pattern_key(theirs.rank_pattern.keys(), key), theirs.r)
        peft_alpha = theirs.alpha_pattern.get(
            get_pattern_key(theirs.alpha_pattern.keys(), key), theirs.lora_alpha
        )
        peft_scale = peft_alpha / (math.sqrt(peft_r) if theirs.use_rslora else peft_r)
        assert ours.rank(key) == peft_r
        assert ours.alpha(key) == peft_alpha
        assert math.isclose(ours.scale(key), peft_scale, rel_tol=1e-12)
