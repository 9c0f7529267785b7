"""The routing study's text: four domains, each with its own alphabet and prefix, and their tasks.

A realistic domain split (code, maths, prose, ...) shows in the prompts' tokens; here each domain
owns one alphabet, and its prompts start with its own prefix:

- kv:  lowercase letters, `k:abc=` -> `xyz`, a fixed random table of 64 three-letter keys;
- mod: digits, `m:07+12=` -> `02`, addition mod 17 over all 289 pairs;
- rev: uppercase letters, `r:ABCD>` -> `DCBA`, reversal, scored on 64 held-out words;
- sub: 16 symbols, `p:!#$%>` -> each symbol through a fixed permutation, scored on 64 held-out strings.

The base corpus teaches copying, shifting and summing in every alphabet, so the base knows every
token but none of the four tasks. Task objects follow the transfer study's interface
(_transfer_data.Task: examples, batch, scored), so _transfer_models trains and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS = 0, 1, 2
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"
SYMBOLS = "!#$%&*()[]{}@?^~"
CHARS = LOWER + UPPER + DIGITS + SYMBOLS + ":+=>. "
VOCAB = 3 + len(CHARS)
ALPHABETS = (LOWER, UPPER, DIGITS, SYMBOLS)
MODULUS, TABLE_SIZE, SCORED = 17, 64, 64
TABLE_SEED, HELD_OUT_SEED, CIPHER_SEED, SCORED_SEED = 21, 22, 23, 24
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
        rows = []
        for _ in range(size):
            ids: list[int] = []
            while len(ids) < length:
                ids += [BOS, *encode(self.line(rng)), EOS]
            rows.append(ids[:length])
        return np.array(rows, dtype=np.int64)


@dataclass(frozen=True)
class Task:
    """A domain's task: prompts with their answers, for training draws and for scoring."""

    name: str
    prompt_len: int
    answer_len: int

    def examples(self, rng: np.random.Generator | None = None, size: int = 0) -> list[tuple[str, str]]:
        """The scored set (rng None, SCORED pairs) or `size` training draws from rng."""
        if self.name == "kv":
            table = _table()
            return table if rng is None else [table[i] for i in rng.integers(0, len(table), size)]
        if self.name == "mod":
            pairs = [(a, b) for a in range(MODULUS) for b in range(MODULUS)]
            if rng is None:
                order = np.random.default_rng(SCORED_SEED).permutation(len(pairs))[:SCORED]
                pairs = [pairs[i] for i in order]
            else:
                pairs = [pairs[i] for i in rng.integers(0, len(pairs), size)]
            return [(f"m:{a:02d}+{b:02d}=", f"{(a + b) % MODULUS:02d}") for a, b in pairs]
        alphabet, apply = (UPPER, lambda w: w[::-1]) if self.name == "rev" else (SYMBOLS, _cipher)
        prefix = "r" if self.name == "rev" else "p"
        held = _held_out(alphabet, self.answer_len)
        words = held if rng is None else [_word(rng, alphabet, self.answer_len) for _ in range(size)]
        return [(f"{prefix}:{w}>", apply(w)) for w in words if rng is None or w not in held]

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Training inputs [size, n] and labels (-100 on the prompt, the answer and <eos> scored)."""
        ids = np.array([[BOS, *encode(p + a), EOS] for p, a in self.examples(rng, size)], dtype=np.int64)
        labels = ids.copy()
        labels[:, : 1 + self.prompt_len] = -100
        return ids, labels

    def scored(self, pairs: list[tuple[str, str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The scored prompts [n, 1 + prompt_len] (with <bos>) and answers [n, answer_len]; or of `pairs`."""
        pairs = self.examples() if pairs is None else pairs
        prompts = np.array([[BOS, *encode(p)] for p, _ in pairs], dtype=np.int64)
        return prompts, np.array([encode(a) for _, a in pairs], dtype=np.int64)


def _table() -> list[tuple[str, str]]:
    rng = np.random.default_rng(TABLE_SEED)
    keys: list[str] = []
    while len(keys) < TABLE_SIZE:
        key = _word(rng, LOWER, 3)
        if key not in keys:
            keys.append(key)
    return [(f"k:{key}=", _word(rng, LOWER, 3)) for key in keys]


def _held_out(alphabet: str, n: int) -> list[str]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [_word(rng, alphabet, n) for _ in range(SCORED)]


def _cipher(word: str) -> str:
    perm = np.random.default_rng(CIPHER_SEED).permutation(len(SYMBOLS))
    return "".join(SYMBOLS[perm[SYMBOLS.index(c)]] for c in word)


TASKS = {t.name: t for t in (Task("kv", 6, 3), Task("mod", 8, 2), Task("rev", 7, 4), Task("sub", 7, 4))}
DOMAINS = tuple(TASKS)
