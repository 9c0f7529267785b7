"""The transfer study's text: one character vocabulary, the base corpus, and the adapters' tasks.

Every model of the study shares this vocabulary, so embeddings and output rows line up token by
token across models. The base corpus teaches general skills (copying, shifting letters, counting,
adding, a Zipf lexicon of words); each task is something none of those lines ever shows:

- kv:  `k:abc=` -> `xyz`, a fixed random table of 64 three-letter keys (the task is the table);
- mod: `m:07+12=` -> `02`, addition mod 17 over all 289 pairs (plain sums are in the corpus);
- rev: `r:abcd>` -> `dcba`, reversing four letters (the corpus only copies and shifts), scored on
  128 held-out words; training draws skip them.

Prompts and answers of one task all have the same length, so batches need no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz:+=>. "
VOCAB = 3 + len(CHARS)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MODULUS, TABLE_SIZE, HELD_OUT = 17, 64, 128
TABLE_SEED, LEXICON_SEED, HELD_OUT_SEED = 11, 12, 13
_INDEX = {c: 3 + i for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Token ids of a string (no bos / eos)."""
    return [_INDEX[c] for c in text]


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(LETTERS), n))


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


class Corpus:
    """Seeded lines of the base corpus, drawn from a mix of line kinds (weights per kind)."""

    KINDS = ("copy", "shift", "count", "sum", "words")

    def __init__(self, mix: dict[str, float]):
        lexicon_rng = np.random.default_rng(LEXICON_SEED)
        self.lexicon = [_word(lexicon_rng, int(lexicon_rng.integers(2, 6))) for _ in range(64)]
        ranks = 1.0 / np.arange(1, len(self.lexicon) + 1)
        self.p_word = ranks / ranks.sum()
        weights = np.array([mix.get(kind, 0.0) for kind in self.KINDS])
        self.p_kind = weights / weights.sum()

    def line(self, rng: np.random.Generator) -> str:
        """One line of text."""
        kind = self.KINDS[rng.choice(len(self.KINDS), p=self.p_kind)]
        if kind in ("copy", "shift"):
            word = _word(rng, int(rng.integers(3, 8)))
            return f"c:{word}>{word}" if kind == "copy" else f"s:{word}>{_shift(word)}"
        if kind == "count":
            start = int(rng.integers(10))
            return "n:" + "".join(str((start + i) % 10) for i in range(int(rng.integers(4, 10))))
        if kind == "sum":
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            return f"a:{a:02d}+{b:02d}={a + b:02d}"
        words = rng.choice(len(self.lexicon), int(rng.integers(3, 7)), p=self.p_word)
        return "w:" + " ".join(self.lexicon[i] for i in words)

    def batch(self, rng: np.random.Generator, size: int, length: int) -> np.ndarray:
        """[size, length] int64: lines packed as <bos> line <eos> <bos> line <eos> ..."""
        return pack_lines(lambda: encode(self.line(rng)), size, length)


def pack_lines(line, size: int, length: int) -> np.ndarray:
    """[size, length] int64 rows of `line()`'s token ids packed as <bos> ids <eos> <bos> ids <eos> ..."""
    rows = []
    for _ in range(size):
        ids: list[int] = []
        while len(ids) < length:
            ids += [BOS, *line(), EOS]
        rows.append(ids[:length])
    return np.array(rows, dtype=np.int64)


class PairTask:
    """Training batches and scored sets of a task whose `examples()` are (prompt, answer) strings.

    A subclass names its text's tokenizer as `encode_text` and has `examples(rng, size)` and `prompt_len`.
    """

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Training inputs [size, n] and labels (-100 on the prompt, the answer and <eos> scored)."""
        pairs = self.examples(rng, size)
        ids = np.array([[BOS, *self.encode_text(p + a), EOS] for p, a in pairs], dtype=np.int64)
        labels = ids.copy()
        labels[:, : 1 + self.prompt_len] = -100
        return ids, labels

    def scored(self, pairs: list[tuple[str, str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The scored prompts [n, 1 + prompt_len] (with <bos>) and answers [n, answer_len]; or of `pairs`."""
        pairs = self.examples() if pairs is None else pairs
        prompts = np.array([[BOS, *self.encode_text(p)] for p, _ in pairs], dtype=np.int64)
        return prompts, np.array([self.encode_text(a) for _, a in pairs], dtype=np.int64)


@dataclass(frozen=True)
class Task(PairTask):
    """An adapter's task: prompts with their answers, for training draws and for scoring."""

    name: str
    prompt_len: int
    answer_len: int
    encode_text = staticmethod(encode)  # a class attribute, not a field

    def examples(self, rng: np.random.Generator | None = None, size: int = 0) -> list[tuple[str, str]]:
        """The scored set (rng None) or `size` training draws from rng."""
        if self.name == "kv":
            table = _table()
            return table if rng is None else [table[i] for i in rng.integers(0, len(table), size)]
        if self.name == "mod":
            pairs = [(a, b) for a in range(MODULUS) for b in range(MODULUS)]
            chosen = pairs if rng is None else [pairs[i] for i in rng.integers(0, len(pairs), size)]
            return [(f"m:{a:02d}+{b:02d}=", f"{(a + b) % MODULUS:02d}") for a, b in chosen]
        held = _held_out_words(self.answer_len)
        if rng is None:
            return [(f"r:{w}>", w[::-1]) for w in held]
        words = [_word(rng, self.answer_len) for _ in range(size)]
        return [(f"r:{w}>", w[::-1]) for w in words if w not in held]


def _table() -> list[tuple[str, str]]:
    rng = np.random.default_rng(TABLE_SEED)
    keys: list[str] = []
    while len(keys) < TABLE_SIZE:
        key = _word(rng, 3)
        if key not in keys:
            keys.append(key)
    return [(f"k:{key}=", _word(rng, 3)) for key in keys]


def _held_out_words(n: int) -> list[str]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [_word(rng, n) for _ in range(HELD_OUT)]


TASKS = {task.name: task for task in (Task("kv", 6, 3), Task("mod", 8, 2), Task("rev", 7, 4))}
