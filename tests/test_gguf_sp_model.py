"""A base with a SentencePiece tokenizer.model and no tokenizer.json: written as the converter does."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")

from builders import VOCAB, make_adapter, peft_logits, sample_inputs  # noqa: E402
from gguf_builders import llama_logits  # noqa: E402

from adaptrix.api.compile import compile_adapter  # noqa: E402
from adaptrix.ir.errors import BadInputError, UnsupportedError  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
         "how vexingly quick daft zebras jump", "sphinx of black quartz, judge my vow"]  # fmt: skip
PROBE = "the lazy zebra packs quartz jugs, quickly"  # characters of TEXTS: no byte fallback needed


def _sentencepiece(base, prefix: bool) -> spm.SentencePieceProcessor:
    """A BPE tokenizer.model of fewer ids than the model's VOCAB, trained here."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model,
                                   vocab_size=VOCAB - 8, model_type="bpe", character_coverage=1.0,
                                   add_dummy_prefix=prefix, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)  # fmt: skip
    (base / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model.getvalue())
    return processor


def _detokenized(file, ids: list[int]) -> str:
    """llama.cpp's text of token ids (its SentencePiece pieces, spaces and space prefix)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(file), vocab_only=True, verbose=False)
    try:
        return llm.detokenize(ids).decode()
    finally:
        llm.close()


@pytest.mark.parametrize(("family", "prefix"), [("llama", True), ("gemma2", False)])
def test_a_tokenizer_model_alone_is_written_as_llama_cpp_reads_it(bases, tmp_path, family, prefix):
    base = tmp_path / "base"
    overrides = {"query_pre_attn_scalar": 16} if family == "gemma2" else {}  # llama.cpp's query scale
    shutil.copytree(bases(family, "gguf-sp", **overrides), base)
    processor = _sentencepiece(base, prefix)
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"3": {"content": "<|im_end|>", "special": True}}}))  # fmt: skip
    torch.manual_seed(1)
    adapter = make_adapter(family, base, tmp_path / "adapter")
    compile_adapter(adapter, base, "gguf", tmp_path / "out", quantize="f32")
    file = tmp_path / "out" / "model.gguf"
    reader = gguf.GGUFReader(file)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[index]) for index in field.data]
    scores = reader.fields["tokenizer.ggml.scores"]
    assert len(tokens) == VOCAB  # padded to the model's vocabulary
    for index in range(processor.vocab_size()):  # each id's piece and score, as SentencePiece has them
        expected = b"<|im_end|>" if index == 3 else processor.IdToPiece(index).encode()
        assert tokens[index] == expected
        assert float(scores.parts[scores.data[index]][0]) == (
            -1000.0 if index == 3 else processor.GetScore(index)
        )
    assert tokens[-1] == f"[PAD{VOCAB - 1}]".encode()
    flag = reader.fields.get("tokenizer.ggml.add_space_prefix")  # Gemma's converter writes False
    assert (None if flag is None else bool(flag.parts[flag.data[0]][0])) == (None if prefix else False)
    spaced = (" " + PROBE) if prefix else PROBE  # llama.cpp strips the space it prefixed only when asked
    assert _detokenized(file, processor.encode(PROBE)).lstrip() == spaced.lstrip()
    assert _detokenized(file, processor.encode(PROBE)).startswith(" ") == prefix
    ids = sample_inputs(family, batch=1)["input_ids"][0].tolist()
    expected = peft_logits(family, base, adapter, {"input_ids": torch.tensor([ids])})[0]
    assert (llama_logits(file, ids) - expected).abs().max().item() <= 1e-3


def test_a_tokenizer_model_for_a_family_whose_converter_reads_it_otherwise_is_refused(bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases("phi3"), base)
    _sentencepiece(base, True)
    with pytest.raises(UnsupportedError, match=r"tokenizer\.model alone is read for llama"):
        compile_adapter(make_adapter("phi3", base, tmp_path / "adapter"), base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_model_that_is_not_one_is_refused(bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases("llama"), base)
    (base / "tokenizer.model").write_bytes(b"\x00not a model" * 10)
    with pytest.raises(BadInputError, match="is not a SentencePiece model"):
        compile_adapter(make_adapter("llama", base, tmp_path / "adapter"), base, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
