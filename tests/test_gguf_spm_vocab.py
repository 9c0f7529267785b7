"""A SentencePiece-style tokenizer.json is read for the GGUF metadata without importing transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from builders import make_adapter  # noqa: E402
from gguf_builders import save_sentencepiece_style_tokenizer  # noqa: E402

from adaptrix.targets.gguf.spm_vocab import spm_tokens  # noqa: E402


def _add_tokens(base: Path, added: list[dict], config: dict) -> None:
    """Append added tokens to tokenizer.json (ids past the model's) and keys to tokenizer_config.json."""
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["added_tokens"] += added
    (base / "tokenizer.json").write_text(json.dumps(spec))
    settings = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**settings, **config}))


def _extra(index: int, content: str, special: bool) -> dict:
    return {"id": index, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}  # fmt: skip


@pytest.mark.parametrize("kind", ["plain", "added", "byte_tokens", "class_defaults"])
def test_the_tokens_equal_llama_hf_vocabs(tmp_path, kind):
    base = save_sentencepiece_style_tokenizer(tmp_path / "base", vocab_size=100)
    if kind == "added":  # special: named in the config, only in tokenizer.json; a plain one
        extra = [_extra(100, "<|im_start|>", True), _extra(101, "<|x|>", True), _extra(102, "hey", False)]
        _add_tokens(base, extra, {"additional_special_tokens": ["<|im_start|>"], "pad_token": "<unk>"})
    if kind == "byte_tokens":  # <0xNN> pieces are byte tokens; an added one below the model's size too
        spec = json.loads((base / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        for index, text in enumerate(("<0x0A>", "<0x41>")):
            del vocab[next(t for t, i in vocab.items() if i == 90 + index)]
            vocab[text] = 90 + index
        spec["model"]["merges"] = [pair for pair in spec["model"]["merges"] if "".join(pair) in vocab]
        (base / "tokenizer.json").write_text(json.dumps(spec))
    if kind == "class_defaults":  # LlamaTokenizerFast's own <unk> <s> </s> when the config names none
        settings = json.loads((base / "tokenizer_config.json").read_text())
        for key in ("bos_token", "eos_token", "unk_token"):
            settings.pop(key, None)
        (base / "tokenizer_config.json").write_text(
            json.dumps({**settings, "tokenizer_class": "LlamaTokenizerFast"})
        )
        (base / "special_tokens_map.json").unlink(missing_ok=True)
    spec = json.loads((base / "tokenizer.json").read_text())
    assert spm_tokens(base, spec) == list(gguf.LlamaHfVocab(base).all_tokens())


OTHERS = [{"tokenizer_class": "SomeOtherTokenizerFast"}, {"extra_special_tokens": {"image_token": "<s>"}}]


@pytest.mark.parametrize("config", OTHERS)
def test_an_unknown_tokenizer_class_or_named_extra_tokens_are_left_to_llama_hf_vocab(tmp_path, config):
    base = save_sentencepiece_style_tokenizer(tmp_path / "base", vocab_size=100)
    _add_tokens(base, [], config)
    assert spm_tokens(base, json.loads((base / "tokenizer.json").read_text())) is None


def test_compiling_a_gguf_with_a_sentencepiece_style_tokenizer_does_not_import_transformers(bases, tmp_path):
    base = bases("llama", "gguf-spm-noimport")
    save_sentencepiece_style_tokenizer(base)
    adapter = make_adapter("llama", base, tmp_path / "adapter")
    out = tmp_path / "out"
    script = ("import sys\nfrom adaptrix.api.compile import compile_adapter\n"
              f"compile_adapter({str(adapter)!r}, {str(base)!r}, 'gguf', {str(out)!r}, quantize='q8_0')\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')[:3])\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
