"""The base's own GGUF, built once per (base files, file type, writer version) and cached.

An unmerged compile ships it beside the GGUF LoRA files; later compiles for the same base copy it.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path

from adaptrix.artifacts import GGUF_MODEL, MANIFEST_NAME
from adaptrix.io.cache_dirs import cache_root, make_cache_root
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hashing import files_key
from adaptrix.io.output import atomic_entry
from adaptrix.ir.values import AdapterIR
from adaptrix.targets.gguf.families import GgufFamily
from adaptrix.targets.gguf.model import write_model_gguf

__all__ = ["CACHE_FORMAT", "cached_base"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what a cached base GGUF holds changes
_RECORD = "gguf.json"
_READ = (".safetensors", ".json", ".model", ".jinja")  # weights, config, tokenizer, chat template


def _key(base: Checkpoint, quantize: str) -> str:
    """The cache key: the base's files, the file type and the writer's versions."""
    files = [f for f in base.files() if f.name.endswith(_READ) and f.name != MANIFEST_NAME]
    return files_key(files, format=CACHE_FORMAT, quantize=quantize,
                     versions={"gguf": version("gguf"), "adaptrix": version("adaptrix")})  # fmt: skip


def cached_base(
    base: Checkpoint, family: GgufFamily, quantize: str, cache_dir: Path | str | None = None
) -> tuple[Path, dict]:
    """The cached GGUF of the base alone (built on first use), and the manifest's record of it."""
    key = _key(base, quantize)
    root = cache_root("gguf", cache_dir)
    entry = root / f"gguf-{key[:32]}"
    if not (entry / _RECORD).is_file():
        make_cache_root(root)
        logger.info("writing the base's GGUF (%s) into the cache %s; later compiles reuse it", quantize,
                    entry)  # fmt: skip
        with atomic_entry(entry) as tmp:
            empty = AdapterIR((), base.source)
            section, _ = write_model_gguf(empty, base, tmp / GGUF_MODEL, family, quantize)
            record = {"key": key, "base": str(base.path), **section}
            (tmp / _RECORD).write_text(json.dumps(record, indent=2) + "\n")
    else:
        logger.info("using the cached base GGUF %s", entry)
    record = json.loads((entry / _RECORD).read_text())
    section = {k: v for k, v in record.items() if k not in ("key", "base")}
    return entry / GGUF_MODEL, {**section, "base_gguf": key}
