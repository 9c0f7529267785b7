"""The tokenizer in the GGUF metadata, as llama.cpp's converter writes a BPE tokenizer (_set_vocab_gpt2).

Tokens and their types from tokenizer.json, the pre-tokenizer named by the converter's hash table,
merges, special tokens, add_bos / add_eos and the chat template by the `gguf` package's SpecialVocab.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import gguf

from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.gguf.pre_tokenizers import PRE_TOKENIZERS, PROBE
from adaptrix.targets.gguf.sp_model import SP_MODEL, looks_special, sentencepiece_vocab
from adaptrix.targets.gguf.spm_vocab import spm_tokens

__all__ = ["add_vocab"]

logger = logging.getLogger(__name__)

_TOKENIZER = "tokenizer.json"


def add_vocab(writer: gguf.GGUFWriter, base: Path, vocab_size: int, sentencepiece: str | None = None) -> dict:
    """Write the base's tokenizer into the metadata; return what the manifest records of it.

    `sentencepiece`: how the family's converter writes a tokenizer.model where there is no
    tokenizer.json ("llama"; "no-space-prefix" for Gemma 2 / 3); None where it does not read one.
    """
    file = base / _TOKENIZER
    if not file.is_file() and sentencepiece is not None and (base / SP_MODEL).is_file():
        return _add_sentencepiece(writer, base, vocab_size, sentencepiece == "llama")
    if not file.is_file():
        spm = (base / SP_MODEL).is_file()
        raise UnsupportedError(
            "has no tokenizer.json: llama.cpp reads the vocabulary from the GGUF file"
            + (" (a SentencePiece tokenizer.model alone is read for llama, mistral, mixtral, gemma2 and "
               "gemma3_text only)" if spm else ""),
            path=base,
            fix="save the base's fast tokenizer into it (AutoTokenizer...save_pretrained(BASE))",
        )  # fmt: skip
    spec = read_json(file, what="tokenizer")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"a {model.get('type')} tokenizer: the gguf target writes BPE tokenizers",
                               path=file, fix="use --target merged, then llama.cpp's converter")  # fmt: skip
    if model.get("byte_fallback") and (spec.get("decoder") or {}).get("type") == "Sequence":
        # SentencePiece-style BPE (Llama 2, Mistral, Gemma)
        return _add_llama_hf(writer, base, spec, vocab_size)
    tokens, types = _tokens(spec, vocab_size, file)
    pre = _pre_tokenizer(file)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "chat_template": bool(special.chat_template)}


def _add_llama_hf(writer: gguf.GGUFWriter, base: Path, spec: dict, vocab_size: int) -> dict:
    """A SentencePiece-style tokenizer.json as the converter's _set_vocab_llama_hf writes it, padded."""
    space_prefix = _prepends_space(spec)
    read = spm_tokens(base, spec)  # without transformers where the tokenizer class allows
    if read is None:
        logger.info("%s: tokenizer read through transformers (gguf's LlamaHfVocab)", base)
        read = list(gguf.LlamaHfVocab(base).all_tokens())
    tokens, scores, types = [], [], []
    for text, score, kind in read:
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for index in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's ids
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return _write_llama(writer, base, tokens, scores, types, space_prefix, prefix_last=False)


def _add_sentencepiece(writer: gguf.GGUFWriter, base: Path, vocab_size: int, space_prefix: bool) -> dict:
    """A tokenizer.model as the converter's _set_vocab_sentencepiece writes it."""
    tokens, scores, types = sentencepiece_vocab(base, vocab_size)
    written = _write_llama(writer, base, tokens, scores, types, space_prefix, prefix_last=True)
    return {**written, "source": SP_MODEL}


def _write_llama(writer: gguf.GGUFWriter, base: Path, tokens: list, scores: list, types: list,
                 space_prefix: bool, prefix_last: bool) -> dict:  # fmt: skip
    """The converter's `llama` vocabulary keys, special tokens and chat template; the manifest's record.

    llama.cpp prepends a space to SentencePiece input unless told not to (Gemma). Where the
    converter writes that key differs (before the tokens for a tokenizer.json, after the special
    tokens for a tokenizer.model), and so does the file's key order: `prefix_last` follows it.
    """
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    if not space_prefix and not prefix_last:
        writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if not space_prefix and prefix_last:
        writer.add_add_space_prefix(False)
    chat_template = bool(special.chat_template)
    return {"model": "llama", "pre": "default", "tokens": len(tokens), "chat_template": chat_template}


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer's normalizer prepends "▁" to the text (Llama 2, Mistral; not Gemma)."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers") or [normalizer]
    return any(isinstance(step, dict) and step.get("type") == "Prepend" for step in steps)


def _tokens(spec: dict, vocab_size: int, file: Path) -> tuple[list[str], list[int]]:
    """Every id's token and type: normal, control (special added tokens), user-defined, unused padding."""
    by_id = {int(index): text for text, index in spec["model"]["vocab"].items()}
    added = {int(entry["id"]): entry for entry in spec.get("added_tokens") or []}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise UnsupportedError(f"token id {max(by_id)} is beyond the model's vocab_size {vocab_size}",
                               path=file, fix="use the tokenizer saved with the base")  # fmt: skip
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[index].get("special") or looks_special(by_id[index]):
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens[-1] = tokens[-1].replace("\u2581", " ")  # user-defined spaces, pre-normalized
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def _pre_tokenizer(file: Path) -> str:
    """llama.cpp's pre-tokenizer for this tokenizer, by the converter's probe hash; else "default", logged."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(file)).encode(PROBE).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    logger.warning("%s: llama.cpp's converter does not know this pre-tokenizer (probe hash %s): written as "
                   "'default'; token ids are unaffected, llama.cpp's own text splitting may differ", file,
                   digest[:16])  # fmt: skip
    return "default"
