"""Run a seq2seq ONNX artifact (T5, BART, ...): the encoder, then the decoder on given ids.

The artifact holds optimum's three graphs; ORTModelForSeq2SeqLM generates with them and the KV
cache. Here the encoder runs on the input ids and `decoder_model` on decoder ids, which is what
parity compares with PEFT's forward (logits for each decoder position) and what greedy `generate`
reruns per token. Merged artifacts only: the target writes no unmerged seq2seq graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.onnx.files import read_side_json

__all__ = ["SEQ2SEQ_FILES", "SEQ2SEQ_TASK", "Seq2SeqArtifact", "open_seq2seq"]

SEQ2SEQ_TASK = "text2text-generation-with-past"
SEQ2SEQ_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
_ORT_FAILURES = (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException,
                 ort_state.InvalidGraph, ort_state.InvalidProtobuf, ort_state.NoSuchFile,
                 ort_state.NotImplemented, ort_state.EPFail)  # fmt: skip


def open_seq2seq(path: Path, manifest: dict, options: ort.SessionOptions, provider: str) -> Seq2SeqArtifact:
    """Sessions over the encoder and first-step decoder graphs of a seq2seq artifact."""
    sessions = []
    for name in SEQ2SEQ_FILES[:2]:
        try:
            sessions.append(ort.InferenceSession(str(path / name), options, providers=[provider]))
        except _ORT_FAILURES as exc:
            raise BadInputError(f"onnxruntime cannot load it: {_first_line(exc)}", path=path / name) from None
        if provider not in sessions[-1].get_providers():
            raise BadInputError(f"onnxruntime did not start {provider} for this model", path=path / name,
                                fix="check that the libraries the provider needs are installed")  # fmt: skip
    return Seq2SeqArtifact(path, manifest, *sessions)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


class Seq2SeqArtifact:
    """An opened seq2seq artifact: the decoder's logits for given decoder ids, greedy generation."""

    is_decoder = True  # it generates (run's --max-new-tokens)
    adapter_names: list[str] = []  # noqa: RUF012  (merged only: never changed)

    def __init__(
        self, path: Path, manifest: dict, encoder: ort.InferenceSession, decoder: ort.InferenceSession
    ):
        self.path, self.manifest = path, manifest
        self.section: dict = manifest["onnx"]
        self.task: str = self.section.get("task", "")
        self.encoder, self.decoder = encoder, decoder
        self.config = read_side_json(path, "config.json")
        self.decoder_inputs = {arg.name for arg in decoder.get_inputs()}

    def logits(
        self,
        input_ids: Sequence | np.ndarray,
        attention_mask: Sequence | np.ndarray | None = None,
        *,
        decoder_input_ids: Sequence | np.ndarray | None = None,
        adapter: object = None,
    ) -> np.ndarray:
        """The decoder's logits [batch, decoder length, vocab] for `decoder_input_ids` after the encoder."""
        if adapter is not None:
            raise BadInputError(
                "a seq2seq ONNX artifact is merged: it has no adapters to activate", path=self.path
            )
        ids = self._ids(input_ids)
        if decoder_input_ids is None:
            start = self.config.get("decoder_start_token_id") or 0
            decoder_input_ids = np.full((ids.shape[0], 1), start, np.int64)
        decoder_ids = self._ids(decoder_input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != ids.shape or decoder_ids.shape[0] != ids.shape[0]:
            shapes = f"{list(mask.shape)} and decoder ids {list(decoder_ids.shape)}"
            raise BadInputError(f"attention_mask {shapes} must match input ids {list(ids.shape)}")
        hidden = self._run(self.encoder, {"input_ids": ids, "attention_mask": mask})[0]
        feeds = {"input_ids": decoder_ids, "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        return self._run(self.decoder, {k: v for k, v in feeds.items() if k in self.decoder_inputs})[0]

    def generate(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        *,
        adapter: object = None,
        stop_at_eos: bool = False,
    ) -> list[int]:
        """Greedy decoding: the `max_new_tokens` ids the decoder writes after its start token.

        Each step reruns `decoder_model` on all the ids so far (no KV cache: simple, and exact);
        optimum's ORTModelForSeq2SeqLM generates with the cached graph.
        """
        ids = self._ids(prompt_ids)
        if ids.shape[0] != 1 or ids.shape[1] == 0:
            raise BadInputError(f"generate takes one non-empty prompt, not ids of shape {list(ids.shape)}")
        if max_new_tokens < 0:
            raise BadInputError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        eos = self._eos_ids() if stop_at_eos else set()
        start = self.config.get("decoder_start_token_id") or 0
        tokens: list[int] = []
        while len(tokens) < max_new_tokens and not (tokens and tokens[-1] in eos):
            decoder_ids = np.array([[start, *tokens]], np.int64)
            tokens.append(
                int(np.argmax(self.logits(ids, decoder_input_ids=decoder_ids, adapter=adapter)[0, -1]))
            )
        return tokens

    def _eos_ids(self) -> set[int]:
        eos = self.config.get("eos_token_id")
        if eos is None:
            raise BadInputError("config.json names no eos_token_id", path=self.path,
                                fix="generate without stop_at_eos")  # fmt: skip
        return set(eos) if isinstance(eos, list) else {eos}

    def _ids(self, values: Sequence | np.ndarray) -> np.ndarray:
        ids = np.atleast_2d(np.asarray(values))
        if ids.ndim != 2 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise BadInputError(
                f"token ids: expected integers [batch, length], found {ids.dtype} {list(ids.shape)}"
            )
        vocab = self.config.get("vocab_size")
        if isinstance(vocab, int) and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise BadInputError(f"token ids must lie in [0, {vocab}), found {ids.min()}..{ids.max()}",
                                path=self.path / "config.json")  # fmt: skip
        return ids.astype(np.int64)

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return session.run(None, feeds)
        except _ORT_FAILURES as exc:
            raise BadInputError(f"onnxruntime: {_first_line(exc)}", path=self.path) from None
