"""refit's calibration: prompts from a file, continued by the adapted source, and module inputs.

The prompts file is JSON (a list of token-id lists) or text, one prompt per line, tokenized with
the base's tokenizer. Decoders continue each prompt greedily with the source model carrying the
adapter (transformers' `generate`), so the calibration covers the positions where the adapter
answers; encoders take the prompts as they are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from adaptrix.io.jsonfile import loads_strict
from adaptrix.ir.errors import BadInputError

__all__ = ["batches", "calibration", "is_causal", "is_token_lists", "read_prompts"]

_FIX = "give a JSON list of token-id lists, or a text file with one prompt per line"
# Files a tokenizer is loaded from; text prompts need one of them next to the base's config.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def read_prompts(
    path: str, tokenizer_dir: Path, vocab_size: int, what: str = "option prompts"
) -> list[list[int]]:
    """The prompts of `path` as token ids (text is tokenized with the tokenizer in `tokenizer_dir`).

    `what` names the option in errors (`option prompts`, `--calibration`).
    """
    file = Path(path)
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{what} {path} cannot be read ({exc})", path=file, fix=_FIX) from None
    if file.suffix == ".json":
        prompts = loads_strict(text, path=file, what="prompts file")
        if not is_token_lists(prompts, vocab_size):
            raise BadInputError(f"{what}: not a list of non-empty token-id lists below {vocab_size}",
                                path=file, fix=_FIX)  # fmt: skip
    else:
        prompts = _tokenize([line for line in text.splitlines() if line.strip()], tokenizer_dir, file, what)
    if not prompts:
        raise BadInputError(f"{what}: the file holds no prompt", path=file, fix=_FIX)
    return prompts


def is_token_lists(value: object, vocab_size: int) -> bool:
    """Whether `value` is a list of non-empty lists of token ids in [0, vocab_size)."""
    return isinstance(value, list) and all(
        isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab_size for t in p) for p in value
    )


def _tokenize(lines: list[str], tokenizer_dir: Path, file: Path, what: str) -> list[list[int]]:
    """Token ids of text prompts, with the base's tokenizer; one line if there is none to load."""
    from transformers import AutoTokenizer

    fix = "give the prompts as a JSON list of token-id lists (a .json file), which needs no tokenizer"
    if not any((Path(tokenizer_dir) / name).is_file() for name in _TOKENIZER_FILES):
        raise BadInputError(f"{what}: text prompts need the base's tokenizer files, "
                            f"and {tokenizer_dir} has none", path=file, fix=fix)  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        # transformers fails on incomplete tokenizer files with any of these (AttributeError: no vocab file)
        raise BadInputError(f"{what}: text prompts need the base's tokenizer, and the one in "
                            f"{tokenizer_dir} does not load ({type(exc).__name__}: {exc})",
                            path=file, fix=fix) from None  # fmt: skip
    return [tokenizer(line)["input_ids"] for line in lines]


def batches(sequences: Sequence[list[int]], size: int = 32) -> Iterator[torch.Tensor]:
    """The sequences as [batch, length] id tensors, equal lengths batched together (no padding)."""
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for ids in sequences:
        by_length[len(ids)].append(ids)
    for _, group in sorted(by_length.items()):
        for start in range(0, len(group), size):
            yield torch.tensor(group[start : start + size], dtype=torch.long)


@torch.no_grad()
def calibration(model: torch.nn.Module, prompts: list[list[int]], generate: int) -> list[list[int]]:
    """The prompts, each continued by `generate` greedy tokens of `model` (a decoder), or as they are."""
    if generate == 0 or not is_causal(model):
        return prompts
    found = []
    for ids in batches(prompts):
        mask = torch.ones_like(ids)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=generate,
                             min_new_tokens=generate, do_sample=False, pad_token_id=0)  # fmt: skip
        found += out.tolist()
    return found


def is_causal(model: torch.nn.Module) -> bool:
    """Whether the model is a causal LM (its config names a *ForCausalLM / *LMHeadModel)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in model.config.architectures or [])
