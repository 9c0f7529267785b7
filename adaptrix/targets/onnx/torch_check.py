"""A torch.onnx export is checked against the model's own PyTorch forward before it is cached.

A trace records one run: a branch on the data (a routing loop, a mask built from values, a top-k
sized by the inputs) is frozen as the trace inputs took it, and the graph then computes something
else on other inputs. And the trace runs the eager attention, which in a few families does not
compute what their default (sdpa) one does. So the graph is run on inputs the trace did not see
(another batch size, a longer sequence; for decoders a prefill, then one step on its KV cache)
and compared with the unpatched model's forward as users run it (default attention); a graph off
by more than float rounding is refused, never cached.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.onnx.tasks import CAUSAL_TASK

__all__ = ["CheckInputs", "check_export", "check_inputs", "load_model"]

logger = logging.getLogger(__name__)

_LENGTH = 11  # tokens of the check, longer than the trace (2 x 3 after a past of 4)
_RELATIVE = 1e-3  # of the largest reference value, on top of an absolute 1e-4

_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
CheckInputs = tuple[np.ndarray, np.ndarray]  # (token ids [1, length], the reference's first output)


_CLASSES = {
    CAUSAL_TASK: "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "feature-extraction": "AutoModel",
}


def load_model(base: Checkpoint, task: str, attention: str | None) -> torch.nn.Module:
    """The base's model class for `task` in float32, with `attention` (None: transformers' default)."""
    import transformers

    kwargs = {} if attention is None else {"attn_implementation": attention}
    cls = getattr(transformers, _CLASSES[task])
    return cls.from_pretrained(base.path, dtype=torch.float32, local_files_only=True, trust_remote_code=False,
                               **kwargs).eval()  # fmt: skip


@torch.no_grad()
def check_inputs(model: torch.nn.Module, base: Checkpoint, task: str) -> CheckInputs:
    """Ids the trace does not use and the model's own output on them (before any export patching)."""
    ids = torch.randint(3, base.source.vocab_size, (1, _LENGTH), generator=torch.Generator().manual_seed(7))
    result = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    first = result.logits if task == CAUSAL_TASK or "logits" in result else result[0]
    return ids.numpy(), first.float().numpy()


def check_export(
    file: Path, inputs: CheckInputs, base: Checkpoint, task: str, exporter: str = "torch.onnx"
) -> None:
    """Refuse (one line) a graph whose outputs on `inputs` are not the model's.

    onnxruntime-genai's builder graphs are checked too: it writes each family's graph by hand.
    A float16 graph is held to 1e-2 of the largest value, a float32 one to 1e-3.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    ids, expected = inputs
    got = _decoder_run(session, ids) if task == CAUSAL_TASK else _encoder_run(session, ids)
    error = float(np.abs(got.astype(np.float32) - expected).max())
    half = any(arg.type == "tensor(float16)" for arg in session.get_outputs())
    bound = 1e-4 + (10 if half else 1) * _RELATIVE * float(np.abs(expected).max())
    logger.info("%s graph against the PyTorch forward: max |diff| %.3g (bound %.3g)", exporter, error, bound)
    if not error <= bound:
        raise UnsupportedError(
            f"{exporter}'s graph of this {base.config.get('model_type')} base does not compute its "
            f"PyTorch forward on inputs of its own (max |diff| {error:.3g}, bound {bound:.3g})",
            path=base.path,
            fix="use --target merged or --target hooks for this base",
        )


def _encoder_run(session, ids: np.ndarray) -> np.ndarray:
    names = {arg.name for arg in session.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _decoder_run(session, ids: np.ndarray) -> np.ndarray:
    """The prefill of all tokens but the last, then one step with the KV cache: logits of every position."""
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = [arg.name for arg in session.get_outputs()]
    past = {name: np.zeros((1, arg.shape[1], 0, arg.shape[3]), _FLOATS[arg.type])
            for name, arg in inputs.items() if name.startswith("past_key_values.")}  # fmt: skip
    logits = []
    for start, stop in ((0, ids.shape[1] - 1), (ids.shape[1] - 1, ids.shape[1])):
        feeds = {"input_ids": ids[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
                 "position_ids": np.arange(start, stop, dtype=np.int64)[None], **past}  # fmt: skip
        feeds = {
            name: value for name, value in feeds.items() if name in inputs
        }  # the builder's: no positions
        results = dict(zip(outputs, session.run(None, feeds), strict=True))
        logits.append(results["logits"])
        past = {name: results[name.replace("past_key_values.", "present.")] for name in past}
    return np.concatenate(logits, axis=1)
