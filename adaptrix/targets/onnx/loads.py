"""The last check before an ONNX output is renamed into place: onnxruntime must load it.

The graph is patched by hand (new initializers, rewired inputs, inserted nodes), so a mistake
there (a duplicate name, a dangling input, a type clash) would otherwise reach the user as a
graph that runs nowhere. The check builds an InferenceSession on the CPU provider with graph
optimizations and weight prepacking off: onnxruntime then validates the graph, resolves a
kernel for every node and memory-maps the aligned external weights (write_model aligns them)
without copying or transforming them, so it costs about a graph load, not a weight load
(all-MiniLM-L6-v2, 87 MB of weights: 0.1 s and 11 MB resident; with prepacking on, 41 MB).
So it runs for every artifact, never skipped; onnx-cuda's float16 graphs too have a CPU kernel
for each of their nodes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adaptrix.ir.errors import UnsupportedError

__all__ = ["check_loads"]

logger = logging.getLogger(__name__)


def check_loads(model_path: Path) -> None:
    """Refuse (one line) a written graph that onnxruntime's CPU provider does not load."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    refusals = (state.Fail, state.InvalidGraph, state.InvalidArgument, state.InvalidProtobuf,
                state.NoSuchFile, state.NotFound, state.NotImplemented, state.RuntimeException)  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # the refusal below says what went wrong
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except refusals as exc:
        reason = " ".join(str(exc).partition(" failed:")[2].split() or str(exc).split())  # less the tmp path
        raise UnsupportedError(
            f"{model_path.name}: the ONNX graph written for this adapter does not load in onnxruntime "
            f"({reason}); nothing was written",
            fix="report it as an Adaptrix bug; use --target merged or hooks for this adapter meanwhile",
        ) from None
    del session  # closes the memory-mapped weights before the output is renamed
    logger.info("onnxruntime loads %s", model_path.name)
