"""onnx-cpu on the families issue 25 adds (items 4, 5), with or without a role table: PEFT, or a refusal.

Each base is a tiny seeded model with a PEFT LoRA on `target_modules="all-linear"`; its export is
cached in one folder shared by the module. Merged and unmerged logits must equal PEFT's forward;
seq2seq artifacts (T5, BART) must load in optimum's ORTModelForSeq2SeqLM and generate PEFT's
greedy tokens; a family optimum cannot export, or a graph the patcher does not understand, is
refused with one line naming the family or the module.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers as tf
from onnx import helper
from peft import LoraConfig, PeftModel, get_peft_model

from adaptrix.api.compile import compile_adapter
from adaptrix.api.parity import parity
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.runtimes.onnx.session import open_onnx
from adaptrix.targets.onnx.export import export_base, task_of

TOLERANCE = 1e-4  # the bound for float32 logits
V = 128
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)  # fmt: skip
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64)
_ENC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=V, max_position_embeddings=64)  # fmt: skip
# family: (config class, its arguments, model class); none of them has a role table
pytestmark = pytest.mark.onnx_export  # optimum exports every base here

BUILDS = {
    "opt": (tf.OPTConfig, dict(_ENC, ffn_dim=64, word_embed_proj_dim=32), tf.OPTForCausalLM),
    "bloom": (tf.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=V), tf.BloomForCausalLM),
    "gptj": (tf.GPTJConfig, dict(_GPT2, rotary_dim=4), tf.GPTJForCausalLM),
    "gpt_bigcode": (tf.GPTBigCodeConfig, _GPT2, tf.GPTBigCodeForCausalLM),
    "falcon": (tf.FalconConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=V), tf.FalconForCausalLM),
    "gemma2": (tf.Gemma2Config, dict(_DEC, head_dim=8), tf.Gemma2ForCausalLM),
    "qwen3": (tf.Qwen3Config, dict(_DEC, head_dim=8), tf.Qwen3ForCausalLM),
    "roberta": (tf.RobertaConfig, dict(_ENC, pad_token_id=1), tf.RobertaForMaskedLM),
    "deberta-v2": (tf.DebertaV2Config, _ENC, tf.DebertaV2ForMaskedLM),
    "t5": (tf.T5Config, dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           tf.T5ForConditionalGeneration),
    "bart": (tf.BartConfig, dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                                 bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
             tf.BartForConditionalGeneration),
    "mixtral": (tf.MixtralConfig, dict(_DEC, num_local_experts=2), tf.MixtralForCausalLM),
    "gpt_neo": (tf.GPTNeoConfig, dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=V,
                                      max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                      window_size=8), tf.GPTNeoForCausalLM),
    "codegen": (tf.CodeGenConfig, dict(_GPT2, rotary_dim=4), tf.CodeGenForCausalLM),
    "electra": (tf.ElectraConfig, dict(_ENC, embedding_size=32), tf.ElectraForMaskedLM),
    # a decoder alone: its cross-attention, which all-linear adapts, is never run by the graph
    "bart-decoder": (tf.BartConfig, dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
                     tf.BartForCausalLM),
}  # fmt: skip
# with role tables (fused splits: bloom, falcon, gpt_bigcode), and without (gpt_neo, codegen, electra)
FLAT = ["opt", "bloom", "gptj", "gpt_bigcode", "falcon", "gemma2", "qwen3", "roberta", "deberta-v2",
        "gpt_neo", "codegen", "electra", "bart-decoder"]  # fmt: skip
SEQ2SEQ = ["t5", "bart"]
IDS = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The ONNX export cache every compile of this module shares."""
    return tmp_path_factory.mktemp("onnx-export-cache")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(base, adapter) of a family: a seeded tiny base and a PEFT LoRA on all its linear modules."""
    found: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in found:
            root = tmp_path_factory.mktemp(f"family-{family}")
            config, kwargs, cls = BUILDS[family]
            torch.manual_seed(0)
            cls(config(**kwargs)).eval().save_pretrained(root / "base")
            torch.manual_seed(1)
            lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            get_peft_model(cls.from_pretrained(root / "base"), lora).save_pretrained(root / "adapter")
            found[family] = (root / "base", root / "adapter")
        return found[family]

    return get


def _model(family: str, base: Path, adapter: Path | None = None) -> torch.nn.Module:
    model = BUILDS[family][2].from_pretrained(base).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Every input of a flat graph for IDS: ones, positions, zero types and an empty past."""
    ids, feeds = IDS.numpy(), {}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values."):
            shape = [ids.shape[0] if d == "batch_size" else 0 if isinstance(d, str) else d for d in arg.shape]
            feeds[arg.name] = np.zeros(shape, np.float32)
        else:
            feeds[arg.name] = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                               "position_ids": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
                               "token_type_ids": np.zeros_like(ids)}[arg.name]  # fmt: skip
    return feeds


def _onnx_logits(out: Path, adapter_file: Path | None = None) -> torch.Tensor:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    run = ort.RunOptions()
    if adapter_file is not None:
        loaded = ort.LoraAdapter()
        loaded.Load(str(adapter_file))
        run.add_active_adapter(loaded)  # `loaded` stays alive until the run below
    return torch.from_numpy(session.run(["logits"], _feeds(session), run)[0])


def _assert_peft(family: str, base: Path, adapter: Path, got: torch.Tensor) -> None:
    with torch.no_grad():
        expected = _model(family, base, adapter)(input_ids=IDS).logits
        plain = _model(family, base)(input_ids=IDS).logits
    assert (expected - plain).abs().max() > 100 * TOLERANCE  # the adapter changes what is compared
    assert (got - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("family", FLAT)
def test_merged_onnx_equals_peft(family, made, cache, tmp_path):
    base, adapter = made(family)
    compile_adapter([adapter], base, "onnx-cpu", tmp_path / "out", cache_dir=cache)
    _assert_peft(family, base, adapter, _onnx_logits(tmp_path / "out"))


@pytest.mark.parametrize("family", ["opt", "bloom", "deberta-v2", "codegen"])
def test_unmerged_onnx_equals_peft(family, made, cache, tmp_path):
    base, adapter = made(family)
    out = tmp_path / "out"
    compile_adapter([adapter], base, "onnx-cpu", out, cache_dir=cache, unmerged=True)
    _assert_peft(family, base, adapter, _onnx_logits(out, out / "adapters" / "adapter.onnx_adapter"))


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_onnx_generates_as_peft(family, made, cache, tmp_path):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    base, adapter = made(family)
    out = compile_adapter([adapter], base, "onnx-cpu", tmp_path / "out", cache_dir=cache).out
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"} <= {
        f.name for f in out.iterdir()
    }
    reference, ours = _model(family, base, adapter), ORTModelForSeq2SeqLM.from_pretrained(out)
    greedy = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, min_new_tokens=8,
                  do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        expected, got = reference.generate(**greedy), ours.generate(**greedy)
        plain = _model(family, base).generate(**greedy)
    assert torch.equal(got.sequences, expected.sequences)
    # each step's scores (min_new_tokens masks eos with -inf): the first from decoder_model, the
    # rest from decoder_with_past_model
    steps = zip(got.scores, expected.scores, plain.scores, strict=True)
    for step, (mine, theirs, base_step) in enumerate(steps):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(mine), finite), step
        assert (mine - theirs)[finite].abs().max() <= TOLERANCE, step
        if step == 0:  # the adapter changes what is compared (BART's last step is its forced eos)
            assert (theirs - base_step)[finite].abs().max() > 100 * TOLERANCE
    # adaptrix's own runtime decodes greedily too: each token is PEFT's argmax after the ones before
    tokens = open_onnx(out).generate(IDS[0].tolist(), 8)
    start = torch.tensor([[reference.config.decoder_start_token_id, *tokens[:-1]]])
    with torch.no_grad():
        forced = reference(input_ids=IDS[:1], decoder_input_ids=start).logits
    assert forced[0].argmax(-1).tolist() == tokens


def test_parity_compares_seq2seq_onnx(made, cache, monkeypatch):
    monkeypatch.setenv("ADAPTRIX_CACHE_DIR", str(cache))
    base, adapter = made("t5")
    report = parity(adapter, base, ["merged", "hooks", "onnx-cpu"])
    assert report.ok, report.as_json()
    assert [row.target for row in report.backends] == ["merged", "hooks", "onnx-cpu"]


TASKS = [
    (["LlamaForCausalLM"], False, "text-generation-with-past"),
    (["GPT2LMHeadModel"], False, "text-generation-with-past"),
    (["T5ForConditionalGeneration"], True, "text2text-generation-with-past"),
    (["MarianMTModel"], True, "text2text-generation-with-past"),
    (["RobertaForMaskedLM"], False, "fill-mask"),
    (["DebertaV2ForSequenceClassification"], False, "text-classification"),
    (["ModernBertModel"], False, "feature-extraction"),
]


@pytest.mark.parametrize(("architectures", "encoder_decoder", "task"), TASKS)
def test_each_kind_of_base_gets_its_export_task(architectures, encoder_decoder, task, tmp_path):
    config = {"architectures": architectures, "is_encoder_decoder": encoder_decoder}
    assert task_of(SimpleNamespace(config=config, path=tmp_path)) == task


def test_a_bare_encoder_decoder_has_no_export_task(tmp_path):
    config = {"architectures": ["T5Model"], "is_encoder_decoder": True}
    with pytest.raises(UnsupportedError, match="no ONNX export task"):
        task_of(SimpleNamespace(config=config, path=tmp_path))


def test_a_family_no_exporter_can_export_is_refused_in_one_line(made, cache, tmp_path, monkeypatch):
    # optimum has no mixtral config, so torch.onnx exports it (test_onnx_exporters); where that fails too:
    base, adapter = made("mixtral")

    def fails(*args, **kwargs):
        raise RuntimeError("unordered_map::at\nmore lines of the tracer")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(UnsupportedError) as caught:
        compile_adapter([adapter], base, "onnx-cpu", tmp_path / "out", cache_dir=cache)
    message = str(caught.value)
    assert "mixtral" in message and "torch.onnx" in message and "--target merged" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("unmerged", [False, True])
def test_seq2seq_options_the_graphs_do_not_take_are_refused(unmerged, made, cache, tmp_path):
    base, adapter = made("t5")
    options = {"cache_dir": cache, "unmerged": True} if unmerged else {"cache_dir": cache, "quantize": "int8"}
    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        compile_adapter([adapter], base, "onnx-cpu", tmp_path / "out", **options)


# (family, graph file, the MatMul whose weight goes through a Cast, unmerged, the module refused)
_OPT_Q = ("/decoder/layers.0/self_attn/q_proj/MatMul", "model.decoder.layers.0.self_attn.q_proj")
DOCTORED = [
    ("opt", "model.onnx", _OPT_Q[0], False, _OPT_Q[1]),
    ("opt", "model.onnx", _OPT_Q[0], True, _OPT_Q[1]),
    # decoder_model reads it as the patcher expects; the graph of later steps must not keep the base's
    ("t5", "decoder_with_past_model.onnx", "/decoder/block.1/layer.0/SelfAttention/q/MatMul", False,
     "decoder.block.1.layer.0.SelfAttention.q"),
]  # fmt: skip


@pytest.mark.parametrize(("family", "graph", "matmul", "unmerged", "module"), DOCTORED)
def test_a_weight_no_node_reads_is_refused_naming_its_module(
    family, graph, matmul, unmerged, module, made, cache, tmp_path
):
    """An export whose weight (anonymous, transposed) reaches its MatMul through an op the patcher
    does not know (a Cast): no node it understands reads the weight there."""
    base, adapter = made(family)
    export_base(Checkpoint(base), "float32", cache)  # cached once for the module
    doctored = tmp_path / "cache"
    shutil.copytree(cache, doctored)
    changed = 0
    for graph_file in doctored.glob(f"*/{graph}"):
        model = onnx.load(graph_file, load_external_data=False)
        node = next((n for n in model.graph.node if n.name == matmul), None)
        if node is None:
            continue
        assert node.input[1].startswith("onnx::")  # named by nothing but its use
        cast = helper.make_node("Cast", [node.input[1]], ["weight_cast"], to=onnx.TensorProto.FLOAT)
        node.input[1] = "weight_cast"
        model.graph.node.insert(0, cast)
        onnx.save(model, graph_file)
        changed += 1
    assert changed >= 1  # other families of the shared cache may have a node of that name too
    options = {"cache_dir": doctored, "unmerged": unmerged}
    with pytest.raises(UnsupportedError, match=re.escape(f"module {module}: no ")):
        compile_adapter([adapter], base, "onnx-cpu", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_a_module_called_twice_is_patched_at_each_call(cache, tmp_path):
    """ALBERT shares one layer across its depth: the tracer names the second call's nodes `query_1`,
    `ffn_1`, ..., and the exporter gives them their own copies of the weights; each is merged."""
    from coverage_sweep import build_reference

    ref = build_reference("albert", "masked", tmp_path / "albert")
    out = compile_adapter([ref.adapter], ref.base, "onnx-cpu", tmp_path / "out", cache_dir=cache).out
    got = open_onnx(out).logits(ref.inputs["input_ids"].numpy())
    assert np.abs(got - ref.logits.numpy()).max() <= TOLERANCE


def test_an_export_another_process_finished_meanwhile_is_used(made, cache, tmp_path, monkeypatch):
    """Two compiles of bases with the same weights export at once: the slower one takes the other's."""
    from adaptrix.targets.onnx import export as exporting

    base, _ = made("opt")
    done = export_base(Checkpoint(base), "float32", cache)  # what the other process wrote
    other = tmp_path / "cache"

    def finished_meanwhile(*_args):
        shutil.copytree(done.path, other / done.path.name)

    monkeypatch.setattr(exporting, "check_exportable", finished_meanwhile)
    found = export_base(Checkpoint(base), "float32", other)
    assert found.path == other / done.path.name and (found.path / "export.json").is_file()
