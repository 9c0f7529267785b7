"""The routing study's text: four domains, each with its own alphabet and prefix, and their tasks.

A realistic domain split (code, maths, prose, ...) shows in the prompts' tokens; here each domain
owns one alphabet, and its prompts start with its own prefix: lower (`k:abcd>`), digits
(`m:0123>`), upper (`r:ABCD>`), symbols (`p:!#$%>`). Each domain's task is a fixed random
substitution of its alphabet, applied to four characters, scored on 64 held-out strings.

The base corpus shows copying, shifting and summing in every alphabet, so the base sees every
token but none of the four tasks. Task objects follow the transfer study's interface
(_transfer_data.Task: examples, batch, scored), so _transfer_models trains and scores them.
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
CHARS = LOWER + UPPER + DIGITS + SYMBOLS + ":+=>. "
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
        alphabet = ALPHABETS[int(rng.integers(len(ALPHABETS)))]
        word = _word(rng, alphabet, int(rng.integers(3, 8)))
        return f"c:{word}>{word}" if kind < 2 else f"s:{word}>{_shift(word, alphabet)}"

    def batch(self, rng: np.random.Generator, size: int, length: int) -> np.ndarray:
        """[size, length] int64: lines packed as <bos> line <eos> <bos> line <eos> ..."""
        return pack_lines(lambda: encode(self.line(rng)), size, length)


@dataclass(frozen=True)
class Task(PairTask):
    """A domain's task: a fixed random substitution of its own alphabet, applied to each character.

    The prompt `P:wxyz>` (P the domain's prefix, wxyz four characters of its alphabet) is answered by
    the four characters through the domain's permutation. Scored on SCORED held-out strings that no
    training draw shows.
    """

    name: str
    prefix: str
    alphabet: str
    seed: int
    length: int = 4
    encode_text = staticmethod(encode)  # a class attribute, not a field

    @property
    def prompt_len(self) -> int:
        """Characters of a prompt: prefix, colon, the string, `>`."""
        return len(self.prefix) + self.length + 2

    @property
    def answer_len(self) -> int:
        """Characters of an answer."""
        return self.length

    def apply(self, word: str) -> str:
        """The word through the domain's permutation."""
        perm = np.random.default_rng(self.seed).permutation(len(self.alphabet))
        return "".join(self.alphabet[perm[self.alphabet.index(c)]] for c in word)

    def examples(self, rng: np.random.Generator | None = None, size: int = 0) -> list[tuple[str, str]]:
        """The scored set (rng None, SCORED pairs) or `size` training draws from rng (held-out skipped)."""
        held = _held_out(self.alphabet, self.length)
        words = held if rng is None else [_word(rng, self.alphabet, self.length) for _ in range(size)]
        return [(f"{self.prefix}:{w}>", self.apply(w)) for w in words if rng is None or w not in held]


def _held_out(alphabet: str, n: int) -> list[str]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    found: list[str] = []
    while len(found) < SCORED:
        word = _word(rng, alphabet, n)
        if word not in found:
            found.append(word)
    return found


TASKS = {t.name: t for t in (Task("lower", "k", LOWER, 31), Task("digits", "m", DIGITS, 32),
                             Task("upper", "r", UPPER, 33), Task("symbols", "p", SYMBOLS, 34))}  # fmt: skip
DOMAINS = tuple(TASKS)
