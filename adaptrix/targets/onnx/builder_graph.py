"""What the ONNX target does differently on onnxruntime-genai's builder graph.

- Its genai_config.json is the builder's own (GroupQueryAttention shares the KV buffers), naming
  the written graph.
- `--unmerged` exports the builder's graph with q / k / v unpacked (`fuse_qkv=false`, cached as its
  own export), so each module has its own MatMul for its LoRA branch; the branch's MatMul is
  found by the weight it reads, located by value as for merging (builder_patch.locate).
- IA3 scales, bottleneck adapters and GPTQ calibration find their nodes by optimum's node names,
  which this graph does not have: refused in one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import UnsupportedError
from adaptrix.targets.onnx.builder_patch import locate
from adaptrix.targets.onnx.genai import GENAI_CONFIG
from adaptrix.targets.onnx.graph import Use

__all__ = ["builder_genai_config", "builder_uses", "refuse_on_builder"]

logger = logging.getLogger(__name__)

_FIX = 'compile without it, or install "adaptrix[onnx]" (transformers < 4.58) for optimum\'s graph'


def refuse_on_builder(*, calibration, bottlenecks: bool, scales: bool, routed: bool = False) -> None:
    """Refuse (one line) what the builder's graph does not take from Adaptrix yet."""
    for asked, what in ((calibration is not None, "--calibration"), (bottlenecks, "bottleneck adapters"),
                        (scales, "IA3 scales"), (routed, "--pass route")):  # fmt: skip
        if asked:
            raise UnsupportedError(
                f"{what}: not supported on onnxruntime-genai's builder graph (the ONNX exporter of this "
                "decoder where optimum is not installed)",
                fix=_FIX,
            )


def builder_genai_config(cached: Path, out: Path, model_file: str) -> str:
    """Write the builder's own genai_config.json into `out`, naming `model_file`; return its name."""
    genai = read_json(cached, what="the cached builder's genai config")
    genai["model"]["decoder"]["filename"] = model_file
    (out / GENAI_CONFIG).write_text(json.dumps(genai, indent=2, sort_keys=True) + "\n")
    return GENAI_CONFIG


def builder_uses(
    base: Checkpoint, model: onnx.ModelProto, folder: Path, weights: Sequence[str]
) -> dict[str, list[Use]]:
    """{weight: [its MatMul's use]} for each of `weights`, found in the (unpacked) builder graph."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[int]] = {}
    for position, node in enumerate(graph.node):
        if node.op_type == "MatMul" and len(node.input) == 2:
            readers.setdefault(node.input[1], []).append(position)
    uses: dict[str, list[Use]] = {}
    for weight in weights:
        expected = base.read(weight).to(torch.float32).numpy()
        slot = locate(weight, expected, initializers, folder, base)
        whole = slot.start == 0 and tuple(initializers[slot.initializer].dims) == expected.shape[::-1]
        found = readers.get(slot.initializer, [])
        if not (slot.transposed and whole and len(found) == 1):
            raise UnsupportedError(
                f"module {weight.rpartition('.')[0]}: its weight is not the whole weight of one MatMul in "
                "onnxruntime-genai's graph (packed with others), so it cannot get a LoRA branch",
                path=base.path,
                fix="compile without --unmerged (the adapter merged), or use --target hooks",
            )
        uses[weight] = [Use(found[0], 1, slot.initializer, True, True)]  # x @ W.T, stored [in, out]
    return uses
