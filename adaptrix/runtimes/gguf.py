"""Run a GGUF artifact (`--target gguf`) with llama.cpp through llama-cpp-python.

Logits in float32 with a float32 KV cache (llama.cpp's default float16 cache would round keys and
values), greedy generation, and llama.cpp's own tokenizer read from the GGUF file. An unmerged
artifact's GGUF LoRA files are applied at load time, one adapter per loaded model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptrix.artifacts import GGUF_MODEL, MANIFEST_NAME
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["GgufModel", "open_gguf"]

_F32 = 0  # GGML_TYPE_F32, for the KV cache


@dataclass
class GgufModel:
    """A compiled GGUF artifact: its directory, manifest section and the adapters it ships."""

    path: Path
    section: dict
    threads: int | None = None
    task: str = "text-generation"
    is_decoder: bool = True

    @property
    def adapter_names(self) -> list[str]:
        """The unmerged artifact's adapters, in the order they were given."""
        return list(self.section.get("lora") or {})

    def _llama(self, adapter: str | None, logits_all: bool, n_ctx: int):
        """A llama.cpp model of the artifact, with `adapter`'s GGUF LoRA applied."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UnsupportedError("running a GGUF artifact needs llama-cpp-python, which is not installed",
                                   fix='pip install "adaptrix[gguf]"') from None  # fmt: skip
        kwargs = {}
        if adapter is None and self.adapter_names:
            names = "|".join(self.adapter_names)
            raise BadInputError("is unmerged: its GGUF LoRA adapters are applied one at a time",
                                path=self.path, fix=f"choose one: --adapter {names}")  # fmt: skip
        if adapter is not None:
            lora = self.section.get("lora") or {}
            if adapter not in lora:
                raise BadInputError(f"has no adapter {adapter!r}", path=self.path,
                                    fix=f"choose one of: {', '.join(lora) or '(none: merged)'}")  # fmt: skip
            kwargs["lora_path"] = str(self.path / lora[adapter]["file"])
        with _plain_weights():
            return Llama(model_path=str(self.path / GGUF_MODEL), logits_all=logits_all,
                         n_ctx=max(n_ctx, 8), n_threads=self.threads, verbose=False, type_k=_F32,
                         type_v=_F32, **kwargs)  # fmt: skip

    def logits(self, rows: list[list[int]], adapter: str | None = None) -> np.ndarray:
        """Logits [rows, positions, vocab] of equal-length token id rows, each run from an empty cache."""
        llm = self._llama(adapter, True, max(len(row) for row in rows))
        try:
            out = []
            for row in rows:
                llm.reset()
                llm.eval(row)
                out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
            return np.stack(out)
        finally:
            llm.close()

    def generate(
        self, ids: list[int], count: int, adapter: str | None = None, stop_at_eos: bool = False
    ) -> list[int]:
        """`count` greedy new token ids after `ids` (fewer with `stop_at_eos` when EOS comes)."""
        llm = self._llama(adapter, False, len(ids) + count)
        try:
            out: list[int] = []
            for token in llm.generate(ids, top_k=1, temp=0.0, reset=True) if count else ():
                if stop_at_eos and token == llm.token_eos():
                    break
                out.append(int(token))
                if len(out) == count:
                    break
            return out
        finally:
            llm.close()

    def tokenize(self, text: str) -> list[int]:
        """The text as llama.cpp's tokenizer (from the GGUF file) splits it, with BOS as the model wants."""
        llm = self._vocab()
        try:
            return llm.tokenize(text.encode(), add_bos=True, special=True)
        finally:
            llm.close()

    def chat(self, text: str) -> list[int]:
        """`text` as a user message in the GGUF's chat template (rendered as transformers does), as ids."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self._vocab()
        try:
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise BadInputError("has no chat template in its GGUF metadata", path=self.path,
                                    fix="drop --chat")  # fmt: skip
            ends = (llm.token_eos(), llm.token_bos())
            eos, bos = (llm.detokenize([token], special=True).decode() for token in ends)
            message = {"role": "user", "content": text}
            prompt = Jinja2ChatFormatter(template, eos, bos)(messages=[message]).prompt
            return llm.tokenize(prompt.encode(), add_bos=False, special=True)  # no BOS beyond the template's
        finally:
            llm.close()

    def detokenize(self, ids: list[int]) -> str:
        """Token ids as text, by llama.cpp's tokenizer."""
        llm = self._vocab()
        try:
            return llm.detokenize(ids).decode("utf-8", errors="replace")
        finally:
            llm.close()

    def _vocab(self):
        from llama_cpp import Llama

        return Llama(model_path=str(self.path / GGUF_MODEL), vocab_only=True, verbose=False)


@contextmanager
def _plain_weights() -> Iterator[None]:
    """Load weights as stored, not repacked into llama.cpp's extra CPU buffer types.

    llama-cpp-python 0.3.36 exposes no option for it (llama.cpp's `use_extra_bufts`), and on a CPU
    with AMX its repacked Q8_0 / Q4_0 / Q4_1 path crashed in eval (segfault) on these models, the
    converter's own file included; repacking only speeds the CPU kernels up. The default params
    are set for the Llama built inside this block only.
    """
    import llama_cpp.llama_cpp as native

    default = native.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    native.llama_model_default_params = params
    try:
        yield
    finally:
        native.llama_model_default_params = default


def open_gguf(path: Path | str, threads: int | None = None) -> GgufModel:
    """Open a directory `adaptrix compile --target gguf` wrote."""
    path = Path(path)
    manifest_file = path / MANIFEST_NAME
    if not (path / GGUF_MODEL).is_file() or not manifest_file.is_file():
        raise BadInputError(f"is not a GGUF artifact (no {GGUF_MODEL} and {MANIFEST_NAME})", path=path,
                            fix="give a directory `adaptrix compile --target gguf` wrote")  # fmt: skip
    manifest = read_json(manifest_file, what="manifest")
    if not isinstance(manifest, dict) or manifest.get("target") != "gguf":
        raise BadInputError("was not compiled for --target gguf", path=path)
    return GgufModel(path, dict(manifest.get("gguf") or {}), threads)
