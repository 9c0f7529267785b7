"""A decoder base exported by onnxruntime-genai's model builder, as the cached float graph.

The builder runs in a child process: its package puts its own folder on sys.path and imports
top-level modules named `builders` and `quantization`, which would shadow or be shadowed by
the caller's. It is asked for the float graph only (fp32, or fp16 for CUDA); `--quantize int4`
rounds the patched weights afterwards as for any other graph. The child skips the builder's
tokenizer steps (Adaptrix copies the base's own tokenizer files into every artifact, and a base
without one is still exported). The KV cache inputs' symbolic head dimension is fixed to the
head size the builder's genai_config.json records, so the graph says its own cache shape.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import onnx

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError

__all__ = ["BUILDER_GENAI", "build_decoder"]

logger = logging.getLogger(__name__)

BUILDER_GENAI = "genai_config.json"
_PRECISIONS = {"float32": "fp32", "float16": "fp16"}
_DRIVER = """
import sys
from transformers import AutoConfig
from onnxruntime_genai.models import builder

base, out, precision, provider, cache = sys.argv[1:6]
extra = sys.argv[6:]  # KEY=VALUE options of the builder

def details(model_name, input_path, cache_dir, extra_options):
    config = AutoConfig.from_pretrained(input_path, local_files_only=True, trust_remote_code=False)
    return {"extra_kwargs": {}, "hf_name": input_path, "hf_config": config}

builder.get_hf_details = details
builder.Model.save_processing = lambda self, *args: None
options = builder.parse_extra_options(None, base, out, precision, provider, cache, extra)
builder.create_model(None, base, out, precision, provider, cache, **options)
"""


def build_decoder(
    base: Checkpoint, dtype: str, provider: str, into: Path, packed: bool = True
) -> tuple[onnx.ModelProto, dict]:
    """The builder's graph of `base` (weights loaded) and its genai config, built under `into`.

    Not `packed`: q / k / v as three MatMuls (the builder's `fuse_qkv=false`), for LoRA branches.
    """
    raw, cache = into / "raw", into / "builder-cache"
    precision = _PRECISIONS[dtype]
    command = [sys.executable, "-c", _DRIVER, str(base.path), str(raw), precision, provider, str(cache)]
    command += [] if packed else ["fuse_qkv=false"]
    logger.info("exporting %s with onnxruntime-genai's model builder (%s, %s)", base.path, dtype, provider)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (raw / "model.onnx").is_file():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise UnsupportedError(
            f"onnxruntime-genai's model builder failed on this {base.config.get('model_type')} base "
            f"({lines[-1][:200]})",
            path=base.path,
            fix="use --target merged or --target hooks for this base",
        )
    genai = json.loads((raw / BUILDER_GENAI).read_text())
    model = onnx.load(raw / "model.onnx", load_external_data=True)
    _fix_cache_dims(model.graph, int(genai["model"]["decoder"]["head_size"]))
    return model, genai


def _fix_cache_dims(graph: onnx.GraphProto, head_size: int) -> None:
    """Give the KV cache inputs and outputs their fixed head dimension (the builder leaves it symbolic)."""
    for value in (*graph.input, *graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].HasField("dim_value"):
                dims[3].dim_value = head_size
