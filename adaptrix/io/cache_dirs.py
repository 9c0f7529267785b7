"""Where Adaptrix caches what it builds once per base (ONNX exports, base GGUFs, dequantized bases)."""

from __future__ import annotations

import os
from pathlib import Path

from adaptrix.ir.errors import BadInputError

__all__ = ["cache_root", "make_cache_root"]


def cache_root(kind: str, cache_dir: Path | str | None = None) -> Path:
    """The cache of `kind` ("onnx", "gguf"): `cache_dir`, else $ADAPTRIX_CACHE_DIR, else the XDG cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ADAPTRIX_CACHE_DIR"):
        return Path(os.environ["ADAPTRIX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptrix" / kind


def make_cache_root(root: Path) -> None:
    """Create a cache folder (and its parents), or say in one line that it cannot be created."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the cache directory: {exc.strerror}", path=root,
                            fix="pass --cache-dir with a writable directory") from None  # fmt: skip
