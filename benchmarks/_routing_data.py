"""The routing study's text: four domains, each with its own alphabet and separator, and their tasks.

A realistic domain split (code, maths, prose, ...) shows in the prompts' tokens; here each domain
owns one alphabet and one separator, and every token of its prompts is its own: lower (`abcd;`),
digits (`0123/`), upper (`ABCD|`), symbols (`!#$%_`). (Version 1 wrote `k:abcd>`, `m:0123>`, ...:
`:` and `>` were shared by all domains, and `>` is the token whose hidden state predicts the first
answer character; docs/routing.md.) Each domain's task is its own reordering of four characters
(reverse, rotate left, swap pairs, rotate right), scored on 64 held-out strings.

The base corpus shows copying (`abc;abc`) and shifting (`;abc;bcd`) in every alphabet with its
separator, and sums of two-digit numbers, so the base sees every token but none of the four tasks.
Task objects follow the transfer study's interface (_transfer_data.Task: examples, batch, scored),
so _transfer_models trains and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from _transfer_data import PairTask, pack_lines

PAD, BOS, EOS = 0, 1, 2
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"
SYMBOLS = "!#$%&*()[]{}@?^~"
SEPARATORS = ";|/_"  # of ALPHABETS: lower, upper, digits, symbols
CHARS = LOWER + UPPER + DIGITS + SYMBOLS + SEPARATORS + ":+=>. "
VOCAB = 3 + len(CHARS)
ALPHABETS = (LOWER, UPPER, DIGITS, SYMBOLS)
SCORED, HELD_OUT_SEED = 64, 22
_INDEX = {c: 3 + i for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Token ids of a string (no bos / eos)."""
    return [_INDEX[c] for c in text]


def _word(rng: np.random.Generator, alphabet: str, n: int) -> str:
    return "".join(rng.choice(list(alphabet), n))


def _shift(word: str, alphabet: str) -> str:
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in word)


class Corpus:
    """Seeded lines of the base corpus: copy and shift in every alphabet, sums of two-digit numbers."""

    def line(self, rng: np.random.Generator) -> str:
        """One line of text."""
        kind = int(rng.integers(5))
        if kind == 4:
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            return f"a:{a:02d}+{b:02d}={a + b:02d}"
        which = int(rng.integers(len(ALPHABETS)))
        alphabet, sep = ALPHABETS[which], SEPARATORS[which]
        word = _word(rng, alphabet, int(rng.integers(3, 8)))
        return f"{word}{sep}{word}" if kind < 2 else f"{sep}{word}{sep}{_shift(word, alphabet)}"

    def batch(self, rng: np.random.Generator, size: int, length: int) -> np.ndarray:
        """[size, length] int64: lines packed as <bos> line <eos> <bos> line <eos> ..."""
        return pack_lines(lambda: encode(self.line(rng)), size, length)


@dataclass(frozen=True)
class Task(PairTask):
    """A domain's task: its own reordering of four characters of its alphabet.

    The prompt `wxyzS` (four characters of the domain's alphabet, S its separator) is answered by
    the four characters in the domain's `order` (indices into the prompt's string). Scored on SCORED
    held-out strings that no training draw shows.
    """

    name: str
    separator: str
    alphabet: str
    order: tuple[int, ...]
    length: int = 4
    encode_text = staticmethod(encode)  # a class attribute, not a field

    @property
    def prompt_len(self) -> int:
        """Characters of a prompt: the string and the separator."""
        return self.length + 1

    @property
    def answer_len(self) -> int:
        """Characters of an answer."""
        return self.length

    def apply(self, word: str) -> str:
        """The word's characters in the domain's order."""
        return "".join(word[i] for i in self.order)

    def examples(self, rng: np.random.Generator | None = None, size: int = 0) -> list[tuple[str, str]]:
        """The scored set (rng None, SCORED pairs) or `size` training draws from rng (held-out skipped)."""
        held = _held_out(self.alphabet, self.length)
        words = held if rng is None else [_word(rng, self.alphabet, self.length) for _ in range(size)]
        return [(f"{w}{self.separator}", self.apply(w)) for w in words if rng is None or w not in held]


def _held_out(alphabet: str, n: int) -> list[str]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    found: list[str] = []
    while len(found) < SCORED:
        word = _word(rng, alphabet, n)
        if word not in found:
            found.append(word)
    return found


TASKS = {t.name: t for t in (Task("lower", ";", LOWER, (3, 2, 1, 0)),  # reverse
                             Task("digits", "/", DIGITS, (1, 2, 3, 0)),  # rotate left
                             Task("upper", "|", UPPER, (1, 0, 3, 2)),  # swap pairs
                             Task("symbols", "_", SYMBOLS, (3, 0, 1, 2)))}  # rotate right  # fmt: skip
DOMAINS = tuple(TASKS)
