"""A SentencePiece-style BPE tokenizer.json's tokens, scores and types as gguf's LlamaHfVocab yields them.

LlamaHfVocab loads the tokenizer through transformers (seconds and hundreds of MB) only to read what
tokenizer.json and tokenizer_config.json say: the model's vocabulary, the added tokens past it and
the special tokens. This reads them directly for the tokenizer classes whose special tokens the
config names (Llama's, the generic fast one), and returns None for the others (LlamaHfVocab's job).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from adaptrix.io.jsonfile import read_json

__all__ = ["spm_tokens"]

# transformers' special token attributes, and each tokenizer class's defaults for those it leaves unset
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULTS = {
    None: {},
    "PreTrainedTokenizerFast": {},
    "TokenizersBackend": {},  # transformers 5's generic class
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "LlamaTokenizerFast": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SCORE = -1000.0  # LlamaHfVocab's score for every token


def spm_tokens(base: Path, spec: dict) -> list[tuple[bytes, float, gguf.TokenType]] | None:
    """LlamaHfVocab(base).all_tokens() read without transformers; None where only transformers can tell."""
    specials = _special_tokens(base)
    if specials is None:
        return None
    model = spec["model"]["vocab"]
    size = len(model)
    by_id = {int(index): text for text, index in model.items()}
    added = sorted((int(entry["id"]), entry["content"]) for entry in spec.get("added_tokens") or [])
    by_id.update(dict(added))
    by_text = {text: index for index, text in by_id.items()}
    if any(token not in by_text for token in specials) or set(range(size)) - by_id.keys():
        return None  # transformers would add the missing special token / the vocabulary has holes
    special_ids = {by_text[token] for token in specials}
    above = [(index, text) for index, text in added if index >= size]
    skipped = {index for index, _ in above}
    tokens = [(by_id[index].encode(), _SCORE, _type(index, by_id[index], special_ids))
              for index in range(size) if index not in skipped]  # fmt: skip
    for index, text in above:
        kind = _type(index, "", special_ids) if text in specials else gguf.TokenType.USER_DEFINED
        tokens.append((text.encode(), _SCORE, kind))
    return tokens


def _type(index: int, text: str, special_ids: set[int]) -> gguf.TokenType:
    """LlamaHfVocab's get_token_type: byte tokens <0xNN>, special tokens control, the rest normal."""
    if _BYTE.fullmatch(text):
        return gguf.TokenType.BYTE
    return gguf.TokenType.CONTROL if index in special_ids else gguf.TokenType.NORMAL


def _special_tokens(base: Path) -> list[str] | None:
    """The special tokens transformers would load (named, then additional); None for another class."""
    file = base / "tokenizer_config.json"
    config = read_json(file, what="tokenizer config") if file.is_file() else {}
    mapping = base / "special_tokens_map.json"
    named = read_json(mapping, what="special tokens map") if mapping.is_file() else {}
    if not isinstance(config, dict) or not isinstance(named, dict):
        return None
    cls = config.get("tokenizer_class")
    if cls not in _DEFAULTS or config.get("extra_special_tokens"):
        return None  # another class's defaults, or named extra tokens: transformers versions differ
    if any(_text(named[key]) != _text(config[key]) for key in named.keys() & config.keys()):
        return None  # the two files disagree: which wins is transformers' call
    values = {**_DEFAULTS[cls], **named, **config}
    found: list[str] = []
    for value in [*(values.get(key) for key in _SPECIAL), *(values.get("additional_special_tokens") or [])]:
        text = _text(value)
        if value is not None and not isinstance(text, str):
            return None
        if text is not None and text not in found:
            found.append(text)
    return found


def _text(value):
    """A special token's text: a string, or an AddedToken's saved dict's content."""
    return value.get("content") if isinstance(value, dict) else value
