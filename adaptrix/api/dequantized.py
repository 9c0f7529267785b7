"""A bitsandbytes-quantized base, dequantized once into a cached full-precision copy for the ONNX targets.

The ONNX exporters load a model from a folder; a 4-bit or 8-bit checkpoint is not one they export.
So its weights are written dequantized (each exactly as bitsandbytes' own kernel dequantizes it,
into its compute dtype: the function the adapter was trained against) by the merged target with
no adapter, one tensor at a time, into the cache beside the exports, keyed by the base's file
digests. The ONNX compile then exports, patches and quantizes that copy as it would a
full-precision base: dequantized, then quantized again (`--quantize`) as issue 27 asks of a bnb base.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path

from adaptrix.io.cache_dirs import cache_root, make_cache_root
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hashing import files_key
from adaptrix.io.output import atomic_entry
from adaptrix.ir.values import AdapterIR
from adaptrix.targets.merged import write_merged

__all__ = ["dequantized_base"]

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what a dequantized copy holds changes
_RECORD = "dequantized.json"


def dequantized_base(base: Checkpoint, cache_dir: Path | str | None = None) -> Checkpoint:
    """The cached dequantized copy of a bitsandbytes-quantized `base` (made on first use), opened."""
    # bitsandbytes' dequantization and Adaptrix's writer decide the bytes: their versions are in the key
    versions = {"bitsandbytes": version("bitsandbytes"), "adaptrix": version("adaptrix")}
    scheme = base.quantization.manifest()
    key = files_key(sorted(base.files()), format=FORMAT, scheme=scheme, versions=versions)
    entry = cache_root("onnx", cache_dir) / "dequantized" / key[:16]
    if not (entry / _RECORD).is_file():
        make_cache_root(entry.parent)
        logger.info("writing %s dequantized into the cache %s; later compiles reuse it", base.path, entry)
        with atomic_entry(entry) as tmp:
            write_merged(AdapterIR((), base.source), base, tmp)
            (tmp / _RECORD).write_text(json.dumps({"key": key, "base": str(base.path)}, indent=2) + "\n")
    else:
        logger.info("using the cached dequantized base %s", entry)
    return Checkpoint(entry)
