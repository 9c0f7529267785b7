"""The generic binder: modules from the model's own tree (meta device), MoE experts, encoder-decoders.

Every family here is compiled with a PEFT LoRA on target_modules="all-linear" and compared with
PEFT's own forward in float32 (max |diff| <= 1e-4, the issue's bound).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as tf
from builders import TRANSFORMERS_5
from peft import LoraConfig, PeftModel, get_peft_model

import adaptrix
from adaptrix.binders.tree import tree_binder
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import AdaptrixError, BadInputError, UnsupportedError

TOLERANCE = 1e-4
# transformers 5 builds MoE experts as 3-D parameters and its routers are no Linear; PEFT 0.22's
# "all-linear" reaches them with target_parameters (see also tests/test_moe_packed.py).
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
FAMILIES = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(_DECODER, num_local_experts=4)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(_DECODER, num_experts=4, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32)),
    "t5": (tf.T5Config, tf.T5ForConditionalGeneration,
           dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                vocab_size=128)),
    "bart": (tf.BartConfig, tf.BartForConditionalGeneration,
             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128,
                  max_position_embeddings=64)),
    "xglm": (tf.XGLMConfig, tf.XGLMForCausalLM,  # a family without a role table
             dict(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4, vocab_size=128,
                  max_position_embeddings=64)),
    "bart-decoder": (tf.BartConfig, tf.BartForCausalLM,  # a decoder alone: BART's table has two stacks
                     dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          vocab_size=128, max_position_embeddings=64)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,
            dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 word_embed_proj_dim=32, max_position_embeddings=64)),
}  # fmt: skip


class Made:
    """A tiny base of one family, a PEFT LoRA on all-linear for it, and PEFT's logits."""

    def __init__(self, family: str, root: Path):
        config_class, model_class, kwargs = FAMILIES[family]
        self.model_class, self.base, self.adapter = model_class, root / "base", root / "adapter"
        torch.manual_seed(0)
        model_class(config_class(**kwargs)).eval().save_pretrained(self.base)
        torch.manual_seed(1)
        config = LoraConfig(target_modules="all-linear", init_lora_weights=False, r=4, lora_alpha=8)
        peft_model = get_peft_model(model_class.from_pretrained(self.base), config).eval()
        peft_model.save_pretrained(self.adapter)
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
        self.inputs = {"input_ids": ids}
        if peft_model.config.is_encoder_decoder and "CausalLM" not in model_class.__name__:
            self.inputs["decoder_input_ids"] = ids[:, :5]
        with torch.no_grad():
            self.reference = peft_model(**self.inputs).logits
            base_logits = model_class.from_pretrained(self.base)(**self.inputs).logits
        assert (self.reference - base_logits).abs().max() > 1e-2  # the adapter changes the outputs

    def logits(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**self.inputs).logits

    def load(self, path: Path):
        return self.model_class.from_pretrained(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache: dict[str, Made] = {}

    def get(family: str) -> Made:
        if family not in cache:
            cache[family] = Made(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_and_hooks_equal_peft(made, family, tmp_path):
    item = made(family)
    adaptrix.compile_adapter(item.adapter, item.base, "merged", tmp_path / "merged")
    merged = item.logits(item.load(tmp_path / "merged"))
    assert (merged - item.reference).abs().max() <= TOLERANCE
    adaptrix.compile_adapter(item.adapter, item.base, "hooks", tmp_path / "hooks")
    model = item.load(item.base)
    adaptrix.attach(model, tmp_path / "hooks")
    assert (item.logits(model) - item.reference).abs().max() <= TOLERANCE


def _sites(made_item: Made) -> set[str]:
    report = adaptrix.inspect_adapter(made_item.adapter, base=made_item.base)
    rows = report["rows"]
    return {row["role"] if row["layer"] is None else f"layer {row['layer']} {row['role']}" for row in rows}


def test_moe_experts_router_and_shared_experts_are_sites(made):
    mixtral = _sites(made("mixtral"))
    assert {"layer 1 block_sparse_moe.experts.3.w2", "layer 0 block_sparse_moe.gate"} <= mixtral
    qwen = _sites(made("qwen2_moe"))
    assert {"layer 0 mlp.experts.2.down_proj", "layer 1 mlp.shared_expert.up_proj",
            "layer 1 mlp.shared_expert_gate", "layer 0 mlp.gate"} <= qwen  # fmt: skip


def test_encoder_decoder_modules_are_placed_in_both_stacks(made):
    """Encoder layers 0 .. 1, decoder layers 2 .. 3 (their role tables: tests/test_binders_seq2seq.py)."""
    sites = _sites(made("t5"))
    for name in ("layer 1 attn_q", "layer 2 attn_o", "layer 3 xattn_k", "layer 2 mlp_up", "layer 0 mlp_down"):
        assert name in sites, name
    bart = _sites(made("bart"))
    assert {"layer 3 xattn_v", "layer 0 mlp_up"} <= bart


@pytest.mark.skipif(TRANSFORMERS_5, reason="transformers 5 packs the experts: --to peft refuses them")
def test_peft_reexport_of_module_roles_equals_the_adapter(made, tmp_path):
    item = made("mixtral")
    adaptrix.convert_adapter(item.adapter, to="peft", out=tmp_path / "peft", base=item.base)
    model = PeftModel.from_pretrained(item.load(item.base), tmp_path / "peft")
    assert (item.logits(model) - item.reference).abs().max() <= TOLERANCE


def test_work_that_needs_roles_names_the_family_and_the_fix(made, tmp_path):
    item = made("xglm")
    with pytest.raises(UnsupportedError, match=r"needs semantic roles .* of the xglm base has none; "
                       r"add a role table for xglm in adaptrix/binders/"):  # fmt: skip
        adaptrix.convert_adapter(item.adapter, to="air", out=tmp_path / "a.air", base=item.base)
    assert not (tmp_path / "a.air").exists()
    with pytest.raises(AdaptrixError, match=r"pass project: needs semantic roles"):
        adaptrix.compile_adapter(item.adapter, item.base, "merged", tmp_path / "p", passes=["project"])


def test_a_family_with_a_table_reads_no_module_tree(bases):
    base = Checkpoint(bases("llama"))
    assert base.binder.tree_source is None and base.binder.roles_table


def test_a_table_family_with_modules_it_does_not_name_is_widened_by_its_tree(made):
    base = Checkpoint(made("mixtral").base)
    placed = base.binder.resolve("model.layers.1.block_sparse_moe.experts.2.w3")
    assert placed.layer == 1 and placed.module.roles == ("block_sparse_moe.experts.2.w3",)
    assert placed.module.shape == (64, 32)


def _config(tmp_path: Path, **changes) -> Path:
    data = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_DECODER, **changes}
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path / "config.json"


def test_a_config_asking_for_too_many_layers_is_refused_before_anything_is_built(tmp_path):
    file = _config(tmp_path, model_type="olmo", num_hidden_layers=10**9, architectures=["OlmoForCausalLM"])
    with pytest.raises(BadInputError, match="num_hidden_layers = 1000000000; Adaptrix reads models of"):
        tree_binder(json.loads(file.read_text()), file, None)


def test_an_architecture_of_another_family_is_not_built_from_the_config(tmp_path, caplog):
    file = _config(tmp_path, model_type="olmo", architectures=["LlamaForCausalLM"])
    with caplog.at_level(logging.WARNING):
        binder = tree_binder(json.loads(file.read_text()), file, None)
    assert "LlamaForCausalLM is no model class of OlmoConfig" in caplog.text
    assert binder.name == "olmo" and binder.layer_container == "layers"


def test_an_architecture_name_is_never_code_from_the_model(tmp_path):
    file = _config(tmp_path, model_type="olmo", architectures=["os.system", "__import__('os')"])
    binder = tree_binder(json.loads(file.read_text()), file, None)
    assert binder.resolve("model.layers.0.self_attn.q_proj").module.roles == ("self_attn.q_proj",)


def test_a_module_role_never_equals_a_semantic_role():
    from adaptrix.ir.values import Site

    with pytest.raises(ValueError, match="is not a module name"):
        Site(None, "lm_head")
    assert Site(3, "block_sparse_moe.experts.0.w1").role == "block_sparse_moe.experts.0.w1"


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_a_lora_on_an_encoder_decoders_tied_head_is_refused_by_merged_and_hooked(family, tmp_path):
    config_class, model_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model_class(config_class(**kwargs)).eval().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = LoraConfig(target_modules=["lm_head", "q", "q_proj"], init_lora_weights=False, r=4, lora_alpha=8)
    peft_model = get_peft_model(model_class.from_pretrained(tmp_path / "base"), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="the head an encoder-decoder ties to its embeddings"):
        adaptrix.compile_adapter(tmp_path / "adapter", tmp_path / "base", "merged", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    adaptrix.compile_adapter(tmp_path / "adapter", tmp_path / "base", "hooks", tmp_path / "hooks")
    model = model_class.from_pretrained(tmp_path / "base").eval()
    adaptrix.attach(model, tmp_path / "hooks")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        found = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert (found - expected).abs().max() <= TOLERANCE


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 keeps experts as modules a PEFT adapter names")
def test_peft_reexport_of_packed_experts_is_refused_in_one_line(made, tmp_path):
    item = made("mixtral")
    with pytest.raises(UnsupportedError) as caught:
        adaptrix.convert_adapter(item.adapter, to="peft", out=tmp_path / "peft", base=item.base)
    assert "\n" not in str(caught.value) and "packs" in str(caught.value)
    assert not (tmp_path / "peft").exists()
