"""Tiny bases with a tokenizer (llama.cpp reads the vocabulary from the GGUF file) and llama.cpp's forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from builders import VOCAB

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
# ids 0, 1, 2: the tiny configs' bos 1 and eos 2; <|endoftext|> as Phi-3's tokenizer has it (llama.cpp
# sets token attributes on it in any model whose general.name says phi3)
_SPECIAL = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def save_tokenizer(base: Path, vocab_size: int = VOCAB) -> Path:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens saved into `base` (built offline).

    Ids 0..3 are <unk> <s> </s> <|endoftext|>; then the byte-level symbols of space and printable
    ASCII; then merges of a space with a letter ("Ġa", "Ġb", ...) up to `vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["\u0120"] + [chr(code) for code in range(33, 127)]  # byte-level: Ġ is the space
    vocab = {token: index for index, token in enumerate((*_SPECIAL, *symbols))}
    merges = []
    for letter in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        if len(vocab) == vocab_size:
            break
        merges.append(("\u0120", letter))
        vocab["\u0120" + letter] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(base)
    return base


def llama_logits(model: Path, ids: list[int], lora: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits (one row per position) for the token ids, through llama-cpp-python."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    # type_k / type_v 0: a float32 KV cache (llama.cpp's default, float16, rounds keys and values)
    llm = Llama(model_path=str(model), logits_all=True, n_ctx=64, n_threads=1, verbose=False, type_k=0,
                type_v=0, **kwargs)  # fmt: skip
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


def llama_greedy(model: Path, ids: list[int], count: int) -> list[int]:
    """llama.cpp's greedy continuation of the ids (`count` new tokens)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=64, n_threads=1, verbose=False, type_k=0, type_v=0)
    try:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) == count:
                return out
        return out
    finally:
        llm.close()
