"""Run an ONNX artifact with onnxruntime: logits, greedy generation, swappable LoRA adapters.

Needs numpy and onnxruntime only (no torch, transformers or optimum), so serving code can use it
alone. Decoder graphs (optimum's, torch.onnx's, onnxruntime-genai builder's) take `input_ids`,
`attention_mask`, `position_ids` (if the graph has it; the builder's graphs take no padding) and
`past_key_values.N.key/value` [batch, kv_heads, past, head_dim] by the graph's input names, return
`logits`, `present.N.*`; one graph prefills and decodes. Adapter files are checked before loading.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from adaptrix.ir.errors import BadInputError
from adaptrix.runtimes.onnx.adapter import adapter_file, check_adapter_file, dtype_name
from adaptrix.runtimes.onnx.files import MANIFEST_NAME, MODEL_NAME, read_manifest, read_side_json
from adaptrix.runtimes.onnx.seq2seq import SEQ2SEQ_TASK, Seq2SeqArtifact, open_seq2seq

__all__ = ["DECODER_TASK", "OnnxArtifact", "open_onnx"]

DECODER_TASK = "text-generation-with-past"
PAST_PREFIX = "past_key_values."
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ORT_FAILURES = (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException,
                 ort_state.InvalidGraph, ort_state.InvalidProtobuf, ort_state.NoSuchFile,
                 ort_state.NotImplemented, ort_state.EPFail)  # fmt: skip
_FED = {"input_ids", "attention_mask", "position_ids", "token_type_ids"}
_COMPILE_FIX = "compile one with `adaptrix compile ADAPTER --base BASE --target onnx-cpu -o OUT`"

Adapter = str | Path | ort.LoraAdapter | None
Past = dict[str, np.ndarray]


def open_onnx(
    path: Path | str, provider: str = "cpu", threads: int | None = None
) -> OnnxArtifact | Seq2SeqArtifact:
    """Open an ONNX artifact directory for inference on `provider` ("cpu" or "cuda")."""
    path = Path(path)
    manifest = read_manifest(path)
    if provider not in _PROVIDERS:
        raise BadInputError(f"unknown provider {provider!r}", fix="choose cpu or cuda")
    if _PROVIDERS[provider] not in ort.get_available_providers():
        raise BadInputError(
            f"this onnxruntime ({ort.__version__}) has no {_PROVIDERS[provider]}",
            fix="install onnxruntime-gpu in place of onnxruntime, or run with --provider cpu",
        )
    if provider == "cuda":
        _preload_cuda()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA inputs are graph inputs with initializers: a harmless warning
    if threads is not None:
        options.intra_op_num_threads = threads
    if manifest["onnx"].get("task") == SEQ2SEQ_TASK:  # encoder and decoder graphs
        return open_seq2seq(path, manifest, options, _PROVIDERS[provider])
    model = path / MODEL_NAME
    try:
        session = ort.InferenceSession(str(model), options, providers=[_PROVIDERS[provider]])
    except _ORT_FAILURES as exc:
        raise BadInputError(f"onnxruntime cannot load it: {_first_line(exc)}", path=model) from None
    if _PROVIDERS[provider] not in session.get_providers():
        raise BadInputError(
            f"onnxruntime did not start {_PROVIDERS[provider]} for this model",
            path=model,
            fix="check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed",
        )
    return OnnxArtifact(path, manifest, session)


def _preload_cuda() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages (the provider check says what is missing)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(OSError, RuntimeError):
        preload()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


class OnnxArtifact:
    """An opened ONNX artifact: its manifest, its onnxruntime session and its adapters."""

    def __init__(self, path: Path, manifest: dict, session: ort.InferenceSession):
        self.path = path
        self.manifest = manifest
        self.session = session
        self.section: dict = manifest["onnx"]
        self.task: str = self.section.get("task", "")
        self.inputs = {arg.name: arg for arg in session.get_inputs()}
        self.outputs = [arg.name for arg in session.get_outputs()]
        self.config = read_side_json(path, "config.json")
        self.generation = read_side_json(path, "generation_config.json")
        self._adapters: dict[tuple, ort.LoraAdapter] = {}
        unknown = sorted(n for n in self.inputs if n not in _FED and not n.startswith(PAST_PREFIX))
        if unknown or "input_ids" not in self.inputs:
            raise BadInputError(f"graph inputs {unknown or ['no input_ids']} are not ones adaptrix feeds",
                                path=path / MODEL_NAME, fix=_COMPILE_FIX)  # fmt: skip
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIX)]
        missing = [n for n in self.past_names if _present(n) not in self.outputs]
        if self.is_decoder != bool(self.past_names) or missing:
            raise BadInputError(f"a {self.task} graph whose KV cache inputs and outputs do not pair up",
                                path=path / MODEL_NAME, fix=_COMPILE_FIX)  # fmt: skip
        if self.section["outputs"] != self.outputs:
            listed, found = self.section["outputs"][:3], self.outputs[:3]
            raise BadInputError(f"{MANIFEST_NAME} lists outputs {listed}, {MODEL_NAME} has {found}",
                                path=path, fix="compile the artifact again")  # fmt: skip
        graph_lora = {arg.name: arg.type for arg in session.get_overridable_initializers()}
        listed = (self.lora or {}).get("inputs", {})
        lost = [name for name in listed if name not in graph_lora]
        if lost:
            raise BadInputError(f"{MANIFEST_NAME} lists LoRA input {lost[0]}, which {MODEL_NAME} lacks",
                                path=path, fix="compile the artifact again")  # fmt: skip
        self.lora_dtypes = {name: dtype_name(graph_lora[name]) for name in listed}

    @property
    def is_decoder(self) -> bool:
        """Whether the graph is a decoder with a KV cache (it can generate)."""
        return self.task == DECODER_TASK

    @property
    def lora(self) -> dict | None:
        """The manifest's LoRA section, or None for a merged artifact."""
        return self.section.get("lora")

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters compiled with the artifact."""
        return sorted((self.lora or {}).get("adapters", {}))

    def load_adapter(self, name_or_path: str | Path) -> ort.LoraAdapter:
        """An adapter of the artifact (by name) or any .onnx_adapter file, checked before it is loaded."""
        file = adapter_file(self.path, self.lora, name_or_path)
        stat = file.stat()
        key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._adapters:
            check_adapter_file(file, self.lora, self.lora_dtypes)
            adapter = ort.LoraAdapter()
            try:
                adapter.Load(str(file))
            except RuntimeError as exc:
                raise BadInputError(f"onnxruntime cannot load it: {_first_line(exc)}", path=file) from None
            self._adapters[key] = adapter
        return self._adapters[key]

    def logits(
        self,
        input_ids: Sequence | np.ndarray,
        attention_mask: Sequence | np.ndarray | None = None,
        *,
        token_type_ids: Sequence | np.ndarray | None = None,
        adapter: Adapter = None,
    ) -> np.ndarray:
        """The graph's first output (logits, or last_hidden_state for feature-extraction) for a batch."""
        ids = self._ids(input_ids)
        run_options = self._run_options(adapter)
        if self.is_decoder:
            return self._step(ids, None, attention_mask, run_options)[0]
        feeds = {"input_ids": ids, "attention_mask": self._mask(attention_mask, ids.shape, 0)}
        if "token_type_ids" in self.inputs:
            types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
            feeds["token_type_ids"] = types
        feeds = {name: value for name, value in feeds.items() if name in self.inputs}
        return self._run(feeds, run_options)[0]

    def step(
        self,
        input_ids: Sequence | np.ndarray,
        past: Past | None = None,
        *,
        attention_mask: Sequence | np.ndarray | None = None,
        adapter: Adapter = None,
    ) -> tuple[np.ndarray, Past]:
        """One decoder call: logits for `input_ids` after `past` (None: empty), and the new past."""
        return self._step(self._ids(input_ids), past, attention_mask, self._run_options(adapter))

    def generate(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        *,
        adapter: Adapter = None,
        stop_at_eos: bool = False,
    ) -> list[int]:
        """Greedy decoding with the KV cache: the `max_new_tokens` ids that follow `prompt_ids`."""
        ids = self._ids(prompt_ids)
        if ids.shape[0] != 1 or ids.shape[1] == 0:
            raise BadInputError(f"generate takes one non-empty prompt, not ids of shape {list(ids.shape)}")
        if max_new_tokens < 0:
            raise BadInputError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        context = self.config.get("max_position_embeddings") or self.config.get("n_positions")
        if isinstance(context, int) and ids.shape[1] + max_new_tokens > context:
            raise BadInputError(f"prompt and new tokens need {ids.shape[1] + max_new_tokens} positions, the "
                                f"model has {context}", path=self.path / "config.json")  # fmt: skip
        eos = self._eos_ids() if stop_at_eos else set()
        run_options = self._run_options(adapter)
        logits, past = self._step(ids, None, None, run_options)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            tokens.append(int(np.argmax(logits[0, -1])))
            if tokens[-1] in eos or len(tokens) == max_new_tokens:
                break
            mask = np.ones((1, ids.shape[1] + len(tokens)), np.int64)
            logits, past = self._step(np.array([tokens[-1:]], np.int64), past, mask, run_options)
        return tokens

    def _step(self, ids: np.ndarray, past: Past | None, mask, run_options) -> tuple[np.ndarray, Past]:
        if not self.is_decoder:
            raise BadInputError(f"is a {self.task} model: it has no KV cache to decode with",
                                path=self.path, fix="call logits() for encoders")  # fmt: skip
        past = self._empty_past(ids.shape[0]) if past is None else past
        if sorted(past) != sorted(self.past_names):
            raise BadInputError(f"past: expected the {len(self.past_names)} tensors step() returns, "
                                f"found {sorted(past)}")  # fmt: skip
        past_len = past[self.past_names[0]].shape[2]
        mask = self._mask(mask, ids.shape, past_len)
        lean = "position_ids" in self.section.get("graph", {}).get("dropped_inputs", [])  # its bias masks
        if "position_ids" not in self.inputs and not lean and not mask.all():  # the builder's graphs
            raise BadInputError("this graph (onnxruntime-genai's builder: no position_ids) takes no padding",
                                fix="run each prompt alone, unpadded")  # fmt: skip
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1  # as transformers' generate does for padding
        positions = positions[:, past_len:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        feeds = {name: value for name, value in feeds.items() if name in self.inputs}
        results = dict(zip(self.outputs, self._run(feeds, run_options), strict=True))
        return results["logits"], {name: results[_present(name)] for name in self.past_names}

    def _empty_past(self, batch: int) -> Past:
        past = {}
        for name in self.past_names:
            arg = self.inputs[name]
            heads, head_dim = arg.shape[1], arg.shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int) or arg.type not in _FLOATS:
                raise BadInputError(
                    f"input {name}: expected a float tensor [batch, kv_heads, past, head_dim] with fixed "
                    f"kv_heads and head_dim, found {arg.type} {arg.shape}",
                    path=self.path / MODEL_NAME,
                )
            past[name] = np.zeros((batch, heads, 0, head_dim), _FLOATS[arg.type])
        return past

    def _ids(self, values: Sequence | np.ndarray) -> np.ndarray:
        ids = np.atleast_2d(np.asarray(values))
        if ids.ndim != 2 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            found = f"{ids.dtype} {list(ids.shape)}"
            raise BadInputError(f"token ids: expected integers [batch, length], found {found}")
        vocab = self.config.get("vocab_size")
        if isinstance(vocab, int) and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise BadInputError(f"token ids must lie in [0, {vocab}), found {ids.min()}..{ids.max()}",
                                path=self.path / "config.json")  # fmt: skip
        return ids.astype(np.int64)

    @staticmethod
    def _mask(mask: Sequence | np.ndarray | None, shape: tuple[int, ...], past_len: int) -> np.ndarray:
        expected = (shape[0], past_len + shape[1])
        if mask is None:
            return np.ones(expected, np.int64)
        mask = np.asarray(mask, np.int64)
        if mask.shape != expected:
            raise BadInputError(f"attention_mask: expected shape {list(expected)} (past + new tokens), "
                                f"found {list(mask.shape)}")  # fmt: skip
        return mask

    def _run_options(self, adapter: Adapter) -> ort.RunOptions | None:
        if adapter is None:
            return None
        run_options = ort.RunOptions()
        loaded = adapter if isinstance(adapter, ort.LoraAdapter) else self.load_adapter(adapter)
        run_options.add_active_adapter(loaded)
        return run_options

    def _run(self, feeds: dict[str, np.ndarray], run_options: ort.RunOptions | None) -> list[np.ndarray]:
        try:
            return self.session.run(None, feeds, run_options)
        except _ORT_FAILURES as exc:
            raise BadInputError(f"onnxruntime: {_first_line(exc)}", path=self.path / MODEL_NAME) from None

    def _eos_ids(self) -> set[int]:
        eos = self.generation.get("eos_token_id", self.config.get("eos_token_id"))
        if eos is None:
            raise BadInputError("neither generation_config.json nor config.json names an eos_token_id",
                                path=self.path, fix="generate without stop_at_eos")  # fmt: skip
        return set(eos) if isinstance(eos, list) else {eos}


def _present(past_name: str) -> str:
    return "present." + past_name.removeprefix(PAST_PREFIX)
