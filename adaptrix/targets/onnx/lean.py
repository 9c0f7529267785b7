"""The decoder graph made as lean as onnxruntime-genai's builder writes it: fused norms, packed q/k/v, folded.

Runs after the patches, LoRA / IA3 inputs and bottleneck nodes are in the graph and before
quantization: norm.py (RMSNorm -> (Skip)SimplifiedLayerNormalization), pack.py (q/k/v in one
MatMul and a Split), attention_rotary.py (the packed projection into GroupQueryAttention, which
rotates q and k itself), mask.py (the fused attention's mask in 12 nodes), fold.py (no dead nodes,
Identity or Constant). Each step reports what it did or why it declined, in the manifest.

Last, `position_ids` leaves the graph's inputs when nothing reads it any more (every layer rotates
inside GroupQueryAttention): onnxruntime-genai then neither builds nor copies it each step (about
3% of a 1.1B int4 decode step here). The graph still takes left padding: its attention bias masks
it (mask.py), and the manifest's `dropped_inputs` tells the runtime so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from adaptrix.targets.onnx.attention_rotary import rotary_in_attention
from adaptrix.targets.onnx.fold import fold_graph
from adaptrix.targets.onnx.mask import compact_mask
from adaptrix.targets.onnx.norm import fuse_norms
from adaptrix.targets.onnx.pack import PackReport, pack_qkv

__all__ = ["LeanReport", "lean_decoder"]


@dataclass(frozen=True, slots=True)
class LeanReport:
    """The three steps' reports, for the manifest, and the packed weights (for GPTQ's statistics)."""

    manifest: dict
    packed: PackReport

    def hessians(self, found: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """GPTQ's statistics by weight with each packed weight's added: q, k and v read the same input."""
        if found is None:
            return None
        merged = dict(found)
        for name, parts in self.packed.weights.items():
            if parts[0] in found:
                merged[name] = found[parts[0]]
        return merged


def lean_decoder(model: onnx.ModelProto, values: dict, folder: Path) -> LeanReport:
    """Fuse the norms, pack q/k/v and fold the graph in place; packed weights' values go into `values`."""
    norms = fuse_norms(model)
    packed = pack_qkv(model, values, folder)
    rotary = rotary_in_attention(model)
    mask = compact_mask(model)
    folded = fold_graph(model)
    dropped = _drop_unread_inputs(model, ("position_ids",))
    manifest = {
        "norms": asdict(norms),
        "qkv": {
            "packed_layers": packed.packed,
            "declined": packed.declined,
        },
        "rotary_in_attention": asdict(rotary),
        "mask": asdict(mask),
        "folded": asdict(folded),
        "dropped_inputs": dropped,
    }
    return LeanReport(manifest, packed)


def _drop_unread_inputs(model: onnx.ModelProto, names: tuple[str, ...]) -> list[str]:
    """Remove those of `names` that are graph inputs no node reads; return the names removed."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    dropped = [value.name for value in graph.input if value.name in names and value.name not in read]
    kept = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(kept)
    return dropped
