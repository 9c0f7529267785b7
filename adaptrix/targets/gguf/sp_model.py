"""A SentencePiece tokenizer.model as llama.cpp's converter reads it (_create_vocab_sentencepiece).

For bases that ship tokenizer.model without a tokenizer.json (Llama 2 era checkpoints). Every id
of the model's vocabulary gets its piece, score and type from the SentencePiece model itself
(read by the `sentencepiece` library, as the converter reads it); added_tokens.json and the
tokenizer_config.json's added_tokens_decoder override ids as the converter lets them; ids past
the tokenizer's are `[PADn]`, unused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["SP_MODEL", "looks_special", "sentencepiece_vocab"]

logger = logging.getLogger(__name__)

SP_MODEL = "tokenizer.model"
_MAX_BYTES = 64 << 20  # Llama 2's is 0.5 MB; Gemma's 4 MB
T = gguf.TokenType


def sentencepiece_vocab(base: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types of the model's `vocab_size` ids, as the converter writes them."""
    processor = _load(base / SP_MODEL)
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [int(T.UNUSED)] * vocab_size
    if processor.vocab_size() > vocab_size:
        logger.warning(
            "%s: ids from %d on are past the model's vocab_size: left out", base / SP_MODEL, vocab_size
        )
    for index in range(min(processor.vocab_size(), vocab_size)):
        tokens[index] = processor.IdToPiece(index).encode()
        scores[index] = processor.GetScore(index)
        types[index] = int(_type(processor, index))
    added = base / "added_tokens.json"
    if added.is_file():
        for text, index in _mapping(read_json(added, what="added tokens"), added).items():
            if 0 <= index < vocab_size:
                tokens[index], scores[index], types[index] = text.encode(), -1000.0, int(T.USER_DEFINED)
    config = base / "tokenizer_config.json"
    settings = read_json(config, what="tokenizer config") if config.is_file() else {}
    decoder = (settings.get("added_tokens_decoder") if isinstance(settings, dict) else None) or {}
    if not isinstance(decoder, dict):
        raise BadInputError("has an added_tokens_decoder that is not a map", path=config,
                            fix="restore the base's tokenizer_config.json")  # fmt: skip
    for key, entry in decoder.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and key.isdigit()):
            raise BadInputError(f"added_tokens_decoder entry {key!r} is not an id with its content",
                                path=config, fix="restore the base's tokenizer_config.json")  # fmt: skip
        index, text = int(key), entry["content"]
        if not 0 <= index < vocab_size:
            continue
        if entry.get("special") or looks_special(text):
            types[index] = int(T.CONTROL)
        else:
            text, types[index] = text.replace("\u2581", " "), int(T.USER_DEFINED)  # pre-normalized spaces
        tokens[index], scores[index] = text.encode(), -1000.0
    return tokens, scores, types


def _load(file: Path):
    """The SentencePiece processor of a tokenizer.model, bounded in size."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedError("reading a SentencePiece tokenizer.model needs the sentencepiece package",
                               path=file, fix='pip install "adaptrix[gguf]"') from None  # fmt: skip
    size = file.stat().st_size
    if size > _MAX_BYTES:
        raise BadInputError(f"is {size} bytes, more than a SentencePiece model holds ({_MAX_BYTES})",
                            path=file, fix="restore the base's tokenizer.model")  # fmt: skip
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(file.read_bytes())
    except (RuntimeError, OSError) as exc:
        raise BadInputError(f"is not a SentencePiece model ({exc})", path=file,
                            fix="restore the base's tokenizer.model") from None  # fmt: skip
    return processor


def _type(processor, index: int) -> gguf.TokenType:
    if processor.IsUnknown(index):
        return T.UNKNOWN
    if processor.IsControl(index):
        return T.CONTROL
    if processor.IsUnused(index):
        return T.UNUSED
    return T.BYTE if processor.IsByte(index) else T.NORMAL


def _mapping(value: object, file: Path) -> dict[str, int]:
    """added_tokens.json: token text -> id."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in value.items()
    ):
        raise BadInputError("is not a map of token text to id", path=file, fix="restore the base's file")
    return value


def looks_special(token: str) -> bool:
    """The converter's does_token_look_special: <|...|>, <pad>, <mask>, <unused...>."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )
