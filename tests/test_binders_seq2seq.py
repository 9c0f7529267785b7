"""Encoder-decoders (T5, mT5 / T5 v1.1, BART): role tables for two layer stacks, numbered across them.

Encoder layer i is layer i, decoder layer j is layer E + j. A PEFT LoRA on target_modules="all-linear"
compiles to merged and hooks, and through AIR, equal to PEFT's forward (float32, max |diff| <= 1e-4).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from builders import (
    FAMILIES,
    FP32_TOLERANCE,
    load_model,
    make_adapter,
    model_logits,
    peft_logits,
    sample_inputs,
)
from safetensors.torch import load_file, save_file

import adaptrix
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import AdaptrixError, BadInputError
from adaptrix.ir.role_shapes import role_shape
from adaptrix.ir.values import Role

SEQ2SEQ = ("t5", "mt5", "bart")
_ATTENTION = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O)
_CROSS = (Role.XATTN_Q, Role.XATTN_K, Role.XATTN_V, Role.XATTN_O)
# What each module of a layer is, read off the models' own forward (T5LayerSelfAttention,
# T5LayerCrossAttention, T5DenseGatedActDense: act(wi_0 x) * wi_1 x; BartDecoderLayer).
_T5_ENCODER = {
    **{f"layer.0.SelfAttention.{n}": r for n, r in zip("qkvo", _ATTENTION, strict=True)},
    "layer.0.layer_norm": Role.ATTN_NORM, "layer.1.DenseReluDense.wi": Role.MLP_UP,
    "layer.1.DenseReluDense.wi_0": Role.MLP_GATE, "layer.1.DenseReluDense.wi_1": Role.MLP_UP,
    "layer.1.DenseReluDense.wo": Role.MLP_DOWN, "layer.1.layer_norm": Role.MLP_NORM,
}  # fmt: skip
_T5_DECODER = {
    **{k: v for k, v in _T5_ENCODER.items() if k.startswith("layer.0")},
    **{f"layer.1.EncDecAttention.{n}": r for n, r in zip("qkvo", _CROSS, strict=True)},
    "layer.1.layer_norm": Role.XATTN_NORM,
    **{k.replace("layer.1", "layer.2"): v for k, v in _T5_ENCODER.items() if k.startswith("layer.1")},
}
_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
_BART_ENCODER = {
    **{f"self_attn.{n}": r for n, r in zip(_PROJ, _ATTENTION, strict=True)},
    "self_attn_layer_norm": Role.ATTN_NORM, "fc1": Role.MLP_UP, "fc2": Role.MLP_DOWN,
    "final_layer_norm": Role.MLP_NORM,
}  # fmt: skip
_BART_DECODER = {
    **_BART_ENCODER,
    **{f"encoder_attn.{n}": r for n, r in zip(_PROJ, _CROSS, strict=True)},
    "encoder_attn_layer_norm": Role.XATTN_NORM,
}
_T5_MODEL = {"shared": Role.EMBED, "decoder.final_layer_norm": Role.FINAL_NORM, "lm_head": Role.LM_HEAD}
_BART_MODEL = {"model.shared": Role.EMBED, "model.decoder.embed_positions": Role.EMBED_POS,
               "model.decoder.layernorm_embedding": Role.EMBED_NORM, "lm_head": Role.LM_HEAD}  # fmt: skip
EXPECTED = {  # family: (encoder container, its table, decoder container, its table, model-level roles)
    "t5": ("encoder.block", _T5_ENCODER, "decoder.block", _T5_DECODER, _T5_MODEL),
    "mt5": ("encoder.block", _T5_ENCODER, "decoder.block", _T5_DECODER, _T5_MODEL),
    "bart": ("model.encoder.layers", _BART_ENCODER, "model.decoder.layers", _BART_DECODER, _BART_MODEL),
}


def _expected(family: str, name: str, depth: int) -> tuple[int | None, Role, str] | None:
    """(layer, role, stack) a module must resolve to; None for one the table leaves to the module tree."""
    encoder, encoder_table, decoder, decoder_table, model_level = EXPECTED[family]
    if name in model_level:
        return None, model_level[name], ""
    for container, table, first in ((encoder, encoder_table, 0), (decoder, decoder_table, depth)):
        if (match := re.fullmatch(rf"{re.escape(container)}\.(\d+)\.(.+)", name)) and match[2] in table:
            return first + int(match[1]), table[match[2]], container
    return None


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_every_module_resolves_to_its_role_and_layer(family, bases):
    spec = FAMILIES[family]
    model = spec.model(spec.config(**spec.config_kwargs))
    base = Checkpoint(bases(family))
    depth = model.config.num_layers if family != "bart" else model.config.encoder_layers
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module._parameters.get("weight"), torch.Tensor):
            continue
        placement = base.binder.resolve(name)
        assert placement is not None, name
        expected = _expected(family, name, depth)
        if expected is None:  # relative_attention_bias, the encoder's own norms and positions
            assert placement.layer is None and placement.module.roles == (name.removeprefix("model."),), name
            continue
        layer, role, stack = expected
        assert (placement.layer, placement.module.roles) == (layer, (role,)), name
        found.setdefault(stack, set()).add(placement.key)
    encoder, encoder_table, decoder, decoder_table, _ = EXPECTED[family]
    gated = family == "mt5"  # wi_0 / wi_1 in place of wi
    for stack, table in ((encoder, encoder_table), (decoder, decoder_table)):
        assert found[stack] == {
            k for k in table if not k.endswith(("wi", "wi_0", "wi_1")) or k.endswith("wi") != gated
        }
    assert (base.source.num_layers, base.source.decoder_start) == (5 if family == "mt5" else 4, depth)


def test_cross_attention_shapes_follow_the_heads_not_d_model(bases):
    """mT5 here: num_heads * d_kv = 16 while d_model = 32; k and v read the encoder's d_model."""
    source = Checkpoint(bases("mt5")).source
    assert (source.q_size, source.hidden_size) == (16, 32)
    assert role_shape(Role.XATTN_Q, source) == role_shape(Role.XATTN_K, source) == (16, 32)
    assert role_shape(Role.XATTN_O, source) == (32, 16) and role_shape(Role.XATTN_NORM, source) == (32, 0)


@pytest.mark.parametrize(("family", "stack", "layer"), [
    ("t5", "decoder.block", 1), ("bart", "model.decoder.layers", 1), ("t5", "encoder.block", 0),
])  # fmt: skip
def test_a_checkpoint_with_a_layer_missing_is_refused(family, stack, layer, bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases(family), base)
    tensors = load_file(base / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith(f"{stack}.{layer}.")}
    assert len(kept) < len(tensors)
    save_file(kept, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInputError) as raised:
        Checkpoint(base)
    line = raised.value.line()
    container = stack.removeprefix("model.")
    assert f"says the model has 2 {container} layers, but the weights hold {container} layers" in line
    assert "\n" not in line and str(base / "config.json") in line


def _check(family: str, base: Path, adapter: Path, out: Path) -> None:
    """merged and hooks of `adapter` (PEFT or AIR) equal PEFT's forward of the PEFT adapter."""
    inputs = sample_inputs(family)
    assert "decoder_input_ids" in inputs
    expected = peft_logits(family, base, _peft_of(adapter), inputs)
    assert (model_logits(family, base, inputs) - expected).abs().max() > 100 * FP32_TOLERANCE
    adaptrix.compile_adapter(adapter, base, "merged", out / "merged")
    assert (model_logits(family, out / "merged", inputs) - expected).abs().max() <= FP32_TOLERANCE
    adaptrix.compile_adapter(adapter, base, "hooks", out / "hooks")
    model = load_model(family, base)
    adaptrix.attach(model, out / "hooks")
    with torch.no_grad():
        assert (model(**inputs).logits - expected).abs().max() <= FP32_TOLERANCE


_PEFT_OF: dict[Path, Path] = {}


def _peft_of(adapter: Path) -> Path:
    return _PEFT_OF.get(adapter, adapter)


@pytest.fixture(scope="module")
def all_linear(bases, tmp_path_factory):
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            torch.manual_seed(1)
            path = tmp_path_factory.mktemp(f"all-linear-{family}")
            made[family] = make_adapter(family, bases(family), path, target_modules="all-linear")
        return made[family]

    return get


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_all_linear_lora_compiles_to_merged_and_hooks_equal_to_peft(family, bases, all_linear, tmp_path):
    _check(family, bases(family), all_linear(family), tmp_path)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_air_round_trip_equals_peft(family, bases, all_linear, tmp_path):
    adapter, air = all_linear(family), tmp_path / "adapter.air"
    adaptrix.convert_adapter(adapter, to="air", out=air, base=bases(family))
    report = adaptrix.inspect_adapter(air)
    assert {"xattn_q", "xattn_o"} <= {row["role"] for row in report["rows"]}
    assert report["source"]["decoder_start"] == 2  # the encoder's layers: 0 .. 1
    _PEFT_OF[air] = adapter
    _check(family, bases(family), air, tmp_path)


def test_air_onto_other_encoder_and_decoder_depths_is_refused(bases, all_linear, tmp_path):
    """Same total depth (4), another split: layer 2 would be an encoder layer there."""
    air = tmp_path / "adapter.air"
    adaptrix.convert_adapter(all_linear("t5"), to="air", out=air, base=bases("t5"))
    other = bases("t5", "3+1", num_layers=3, num_decoder_layers=1)
    with pytest.raises(BadInputError, match=r"was made for 2 encoder and 2 decoder layers, the base .* has "
                       r"3 encoder and 1 decoder layers"):  # fmt: skip
        adaptrix.compile_adapter(air, other, "merged", tmp_path / "out")


@pytest.mark.parametrize(("family", "spec", "why"), [
    ("t5", "redistribute", "would move deltas between the encoder and the decoder"),
    ("t5", "redistribute:depth=4", "would move deltas between the encoder and the decoder"),
    ("bart", "project", "would move deltas between the encoder and the decoder"),
    ("t5", "refit:source={base},prompts={prompts}", "runs the models on prompts as decoders or encoders"),
])  # fmt: skip
def test_passes_that_cannot_take_encoder_decoders_refuse_them(family, spec, why, bases, all_linear, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[[5, 6, 7, 8]]")
    spec = spec.format(base=bases(family), prompts=prompts)
    with pytest.raises(AdaptrixError) as raised:
        adaptrix.compile_adapter(all_linear(family), bases(family), "merged", tmp_path / "out", passes=[spec])
    line = raised.value.line()
    stacks = "is an encoder-decoder (encoder layers 0-1, decoder layers 2-3)"
    assert f"pass {spec.partition(':')[0]}: the {family} model {stacks}" in line
    assert why in line and line.endswith("compile without this pass")
    assert not (tmp_path / "out").exists()


def test_a_bart_whose_decoder_has_other_sizes_compiles_from_its_module_tree(bases, tmp_path, caplog):
    """The table reads one intermediate size; such a config keeps merged and hooks (module roles)."""
    base = bases("bart", "wider-decoder", decoder_ffn_dim=128)
    with caplog.at_level("WARNING"):
        binder = Checkpoint(base).binder
    assert "encoder_ffn_dim 64 != decoder_ffn_dim 128: the bart role table reads one size" in caplog.text
    assert not binder.roles_table
    assert binder.resolve("model.decoder.layers.1.fc1").module.roles == ("decoder.layers.1.fc1",)
    torch.manual_seed(1)
    adapter = make_adapter("bart", base, tmp_path / "adapter", target_modules="all-linear")
    _check("bart", base, adapter, tmp_path)
